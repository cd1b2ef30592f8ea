"""Sequence log-probabilities of examples that share a prefix, the prefix computed once.

The Bayes judge scores each response under every level of each judged attribute: ten sequences per turn
that are identical up to the first judged attribute's value in the attribute line (~42 % of their positions
on the synthetic world) and differ after it. Run whole, each of the ten recomputes the system prompt, the
conversation and half the attribute line. Here a group's common prefix goes through the model once, its cached
keys and values are shared by the group's continuations (`LeanDecoder.shared_prefix_hidden`), and the output
layer runs only where a target is trained (the response), not at every position. The figures are
`SEQUENCE_LOG_PROB`'s: each example's summed log-probability of its trained targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerlm.data.collate import Example
from steerlm.inference.decoders import LeanDecoder


def common_prefix(examples: Sequence[Example]) -> int:
    """How many leading ids every example of `examples` shares."""
    shortest = min(len(e.ids) for e in examples)
    first = examples[0].ids
    for index in range(shortest):
        if any(e.ids[index] != first[index] for e in examples[1:]):
            return index
    return shortest


@torch.no_grad()
def grouped_log_probs(decoder: LeanDecoder, groups: Sequence[Sequence[Example]]) -> list[list[float]]:
    """Per group, each example's summed log-probability of its trained targets (the target at position t is
    trained when `trainable[t]`), in float32 as `SEQUENCE_LOG_PROB` sums them (collective under TP).

    A group's common prefix (but at most all but the last id of its shortest example, so every example keeps a
    target after it) is computed once; the hidden state that predicts target t is the prefix's at t - 1 when
    t - 1 lies in the prefix, else the example's own continuation's. Under LongRoPE a group's examples within
    and past the pretraining length rotate differently (as their whole forwards do): each side shares its own."""
    parts: list[list[int]] = []  # per scored group: the indices of its examples in their group
    owners: list[int] = []  # per scored group: its group
    for number, group in enumerate(groups):
        sides: dict[bool, list[int]] = {}
        for index, example in enumerate(group):
            sides.setdefault(decoder.long_rope(len(example.ids) - 1), []).append(index)
        parts += sides.values()
        owners += [number] * len(sides)
    scored = _scored(decoder, [[groups[o][i] for i in part] for o, part in zip(owners, parts)])
    out: list[list[float]] = [[0.0] * len(group) for group in groups]
    for owner, part, values in zip(owners, parts, scored):
        for index, value in zip(part, values):
            out[owner][index] = value
    return out


def _scored(decoder: LeanDecoder, groups: Sequence[Sequence[Example]]) -> list[list[float]]:
    """`grouped_log_probs` of groups whose examples all rotate alike."""
    prefixes: list[list[int]] = []
    owners: list[int] = []
    continuations: list[list[int]] = []
    picks: list[tuple[int, int, int, int]] = []  # (example, from the prefix (1) or continuation (0), row, position)
    targets: list[int] = []
    for number, group in enumerate(groups):
        length = min(common_prefix(group), min(len(e.ids) for e in group) - 1)
        prefixes.append(list(group[0].ids[:length]))
        for example in group:
            row = len(owners)
            owners.append(number)
            continuations.append(list(example.ids[length:-1]))
            for t in range(1, len(example.ids)):
                if example.trainable[t]:
                    at = t - 1
                    picks.append((row, 1, number, at) if at < length else (row, 0, row, at - length))
                    targets.append(example.ids[t])
    shared, own = decoder.shared_prefix_hidden(prefixes, owners, continuations)
    sums = torch.zeros(len(owners), dtype=torch.float32)
    if picks:
        index = torch.tensor(picks, dtype=torch.long, device=shared.device)
        from_prefix = index[:, 1] == 1
        hidden = shared.new_empty(len(picks), shared.shape[-1])
        hidden[from_prefix] = shared[index[from_prefix, 2], index[from_prefix, 3]]
        hidden[~from_prefix] = own[index[~from_prefix, 2], index[~from_prefix, 3]]
        log_p = torch.log_softmax(decoder.vocabulary(hidden).float(), dim=-1)
        token = log_p.gather(-1, torch.tensor(targets, device=log_p.device)[:, None])[:, 0]
        sums.index_add_(0, index[:, 0].cpu(), token.cpu())
    values = sums.double().tolist()
    out, start = [], 0
    for group in groups:
        out.append(values[start : start + len(group)])
        start += len(group)
    return out
