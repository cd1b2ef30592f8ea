"""The chunked vocabulary-parallel cross entropy (`steerlm.models.cross_entropy`) gives megatron's loss and
gradients — against torch's `F.cross_entropy` and megatron's `vocab_parallel_cross_entropy` on full logits, in
one process and under TP=2 (with and without sequence parallelism) — never holds fp32 logits for every
token at once, and leaves positions with a negative label (the masked prompt) out of the output layer's work."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from steerlm.config import CrossEntropy, ParallelConfig, PrecisionConfig
from steerlm.models import cross_entropy
from steerlm.models.cross_entropy import IGNORE_INDEX, chunked_language_model_loss
from steerlm.models.gpt import build_model_chunks
from steerlm.training.losses import LANGUAGE_MODEL
from tests.conftest import GEMMA2_MODEL, TEST_MODEL
from tests.multiproc import run_distributed

SEQ, BATCH, HIDDEN, VOCAB = 12, 3, 16, 384


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.3).to(dtype)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    upstream = torch.rand(BATCH, SEQ, generator=generator) * (torch.rand(BATCH, SEQ, generator=generator) > 0.3)
    return hidden, weight, labels, upstream


def _loss_and_grads(loss_fn, hidden, weight, labels, upstream) -> tuple[torch.Tensor, ...]:
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels)
    (loss * upstream).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def _torch_reference(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()  # [s, b, vocab]
    return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")  # [b, s]


def _megatron_reference(hidden, weight, labels):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(hidden @ weight.t(), labels.transpose(0, 1).contiguous()).transpose(0, 1)


def _chunked(hidden, weight, labels):
    return chunked_language_model_loss(hidden, weight, labels, None, sequence_parallel=False)


@pytest.mark.parametrize("chunk_elements", [VOCAB * 5, 1 << 26], ids=["several_chunks", "one_chunk"])
def test_chunked_loss_and_gradients_equal_torch_and_megatron_in_fp32(layout, monkeypatch, chunk_elements) -> None:
    monkeypatch.setattr(cross_entropy, "FP32_CHUNK_ELEMENTS", chunk_elements)
    inputs = _inputs()
    ours = _loss_and_grads(_chunked, *inputs)
    for reference in (_torch_reference, _megatron_reference):
        for got, expected in zip(ours, _loss_and_grads(reference, *inputs)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_elements", [VOCAB * 5, 1 << 26], ids=["several_chunks", "one_chunk"])
def test_soft_capped_logits_give_torch_s_loss_and_gradients_of_the_capped_logits(monkeypatch, chunk_elements) -> None:
    """Gemma 2's final soft-capping, `cap * tanh(logits / cap)`, inside the chunks: loss and gradients of the capped
    logits; with a cap at the logits' scale (~1.2) they differ from the uncapped ones."""
    monkeypatch.setattr(cross_entropy, "FP32_CHUNK_ELEMENTS", chunk_elements)
    inputs = _inputs()

    def capped(hidden, weight, labels):
        return chunked_language_model_loss(hidden, weight, labels, None, sequence_parallel=False, cap=0.7)

    def reference(hidden, weight, labels):
        logits = torch.tanh((hidden @ weight.t()).float() / 0.7) * 0.7
        return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")

    ours = _loss_and_grads(capped, *inputs)
    for got, expected in zip(ours, _loss_and_grads(reference, *inputs)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (ours[0] - _loss_and_grads(_chunked, *inputs)[0]).abs().max() > 0.1


def test_chunked_loss_in_bf16_matches_megatrons_path(layout, monkeypatch) -> None:
    monkeypatch.setattr(cross_entropy, "FP32_CHUNK_ELEMENTS", VOCAB * 7)
    inputs = _inputs(torch.bfloat16)
    ours = _loss_and_grads(_chunked, *inputs)
    theirs = _loss_and_grads(_megatron_reference, *inputs)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)  # bf16 logits, fp32 loss: same numbers
    for got, expected in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-3)


def _ignoring(labels: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every other row's first 7 positions ignored (a prompt), the upstream gradient 0 there (as a loss mask is)."""
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[::2, :7] = True
    return labels.masked_fill(ignored, IGNORE_INDEX), upstream.masked_fill(ignored, 0.0)


@pytest.mark.parametrize("chunk_elements", [VOCAB * 5, 1 << 26], ids=["several_chunks", "one_chunk"])
def test_ignored_positions_lose_nothing_and_the_rest_equal_torch(layout, monkeypatch, chunk_elements) -> None:
    monkeypatch.setattr(cross_entropy, "FP32_CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, labels, upstream = _inputs()
    ignored_labels, masked_upstream = _ignoring(labels, upstream)
    kept = ignored_labels >= 0
    loss, hidden_grad, weight_grad = _loss_and_grads(_chunked, hidden, weight, ignored_labels, masked_upstream)
    # torch's reference on the original labels, the upstream gradient zero where ignored: what a loss mask gives
    ref_loss, ref_hidden_grad, ref_weight_grad = _loss_and_grads(
        _torch_reference, hidden, weight, labels, masked_upstream
    )
    assert kept.sum() == BATCH * SEQ - 2 * 7
    assert (loss[~kept] == 0).all()
    torch.testing.assert_close(loss[kept], ref_loss[kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_grad, ref_hidden_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_grad, ref_weight_grad, rtol=1e-5, atol=1e-6)
    assert (hidden_grad.transpose(0, 1)[~kept] == 0).all()


def test_ignored_positions_skip_the_output_layer(layout) -> None:
    """The output layer's matrix products (forward, and both backward ones) run over the kept rows only."""
    hidden, weight, labels, upstream = _inputs()
    head_flops = 2 * HIDDEN * VOCAB * 3  # per row: logits, hidden gradient, weight gradient
    flops = {}
    for name, row_labels in {
        "all": labels,
        "ignored": _ignoring(labels, upstream)[0],
        "none_kept": torch.full_like(labels, IGNORE_INDEX),
    }.items():
        with FlopCounterMode(display=False) as counter:
            loss, hidden_grad, weight_grad = _loss_and_grads(_chunked, hidden, weight, row_labels, upstream)
        flops[name] = counter.get_total_flops()
    assert flops == {"all": head_flops * SEQ * BATCH, "ignored": head_flops * (SEQ * BATCH - 14), "none_kept": 0}
    assert (loss == 0).all() and (hidden_grad == 0).all() and (weight_grad == 0).all()  # the last: none kept


class _LargestFloat32(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.largest = max(self.largest, tensor.numel())
        return out


def test_fp32_logits_never_exist_for_every_token_at_once(layout, monkeypatch) -> None:
    monkeypatch.setattr(cross_entropy, "FP32_CHUNK_ELEMENTS", VOCAB * 6)
    hidden, weight, labels, upstream = _inputs(torch.bfloat16)
    with _LargestFloat32() as chunked:
        _loss_and_grads(_chunked, hidden, weight, labels, upstream)
    with _LargestFloat32() as megatron:
        _loss_and_grads(_megatron_reference, hidden, weight, labels, upstream)
    assert megatron.largest == SEQ * BATCH * VOCAB
    assert chunked.largest == 6 * VOCAB


@pytest.mark.parametrize("shape", ["untied", "tied", "gemma2"])
def test_language_model_loss_and_gradients_equal_megatrons_output_layer_path(layout, shape: str) -> None:
    """Gemma 2's capped logits: the chunked loss caps its own, megatron's path through `output_layer`'s hook."""
    tokens = torch.randint(0, TEST_MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(16).expand(2, 16)
    results = []
    base = (
        GEMMA2_MODEL if shape == "gemma2" else replace(TEST_MODEL, share_embeddings_and_output_weights=shape == "tied")
    )
    for impl in (CrossEntropy.chunked, CrossEntropy.megatron):
        model = replace(base, cross_entropy=impl)
        chunk = build_model_chunks(model, PrecisionConfig(), layout, seed=4)[0]
        loss = chunk(tokens, positions, None, labels=tokens.roll(-1, dims=1))
        loss.sum().backward()
        results.append((loss.detach(), {name: p.grad for name, p in chunk.named_parameters()}))
    (ours, our_grads), (theirs, their_grads) = results
    assert ours.shape == (2, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys()
    # the cap's derivative, (1 - tanh^2) here, autograd's through the division by the cap and back: rounding apart
    atol = 1e-5 if shape == "gemma2" else 1e-6
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-5, atol=atol, msg=name)


def test_language_model_task_leaves_the_masked_positions_out_with_the_same_loss(layout) -> None:
    """The training task labels masked positions IGNORE_INDEX: the chunked path's loss there is 0 and the masked
    loss and every gradient equal megatron's output-layer path on the unmodified labels."""
    tokens = torch.randint(0, TEST_MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss_mask = torch.ones(2, 16)
    loss_mask[0, :9] = 0  # a prompt
    loss_mask[1, 12:] = 0  # padding
    batch = {"tokens": tokens, "labels": tokens.roll(-1, dims=1), "loss_mask": loss_mask}
    batch["position_ids"] = torch.arange(16).expand(2, 16)
    chunk = build_model_chunks(TEST_MODEL, PrecisionConfig(), layout, seed=4)[0]
    per_token = LANGUAGE_MODEL.forward(chunk, batch)
    loss_sum, count, _ = LANGUAGE_MODEL.loss(batch, per_token)
    loss_sum.backward()
    assert (per_token[loss_mask == 0] == 0).all() and int(count) == 32 - 9 - 4
    megatron_model = replace(TEST_MODEL, cross_entropy=CrossEntropy.megatron)
    reference = build_model_chunks(megatron_model, PrecisionConfig(), layout, 4)[0]
    reference_loss = (reference(tokens, batch["position_ids"], None, labels=batch["labels"]) * loss_mask).sum()
    reference_loss.backward()
    torch.testing.assert_close(loss_sum, reference_loss, rtol=1e-5, atol=1e-6)
    expected = dict(reference.named_parameters())
    for name, parameter in chunk.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def _tensor_parallel_comparison() -> dict:
    """Per TP layout: per-token losses and this rank's gradient shards of both loss paths, same weights."""
    from steerlm import runtime

    out = {}
    for name, parallel in {
        "tp2": ParallelConfig(tensor_model_parallel_size=2),
        "tp2_sp": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    }.items():
        layout = runtime.initialize(parallel, seed=0)
        tokens = torch.randint(0, TEST_MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        labels, upstream = _ignoring(tokens.roll(-1, dims=1), torch.linspace(0, 1, 32).view(2, 16))
        for impl in (CrossEntropy.chunked, CrossEntropy.megatron):
            chunk = build_model_chunks(replace(TEST_MODEL, cross_entropy=impl), PrecisionConfig(), layout, 4)[0]
            loss = chunk(tokens, torch.arange(16).expand(2, 16), None, labels=labels)
            (loss * upstream).sum().backward()
            loss = loss.masked_fill(labels < 0, 0.0)  # megatron's path computes a value there that a loss masks
            grads = {n: p.grad.clone() for n, p in chunk.named_parameters()}
            if parallel.sequence_parallel:  # norm gradients are summed over the TP group by finalize_model_grads
                grads = {n: g for n, g in grads.items() if "layernorm" not in n}
            out[f"{name}_{impl.value}"] = {"loss": loss.detach(), "grads": grads}
        runtime.shutdown(destroy_process_group=False)
    runtime.shutdown()
    return out


@pytest.mark.slow
def test_chunked_loss_equals_megatrons_under_tensor_parallelism() -> None:
    for rank in run_distributed(_tensor_parallel_comparison, 2):
        for layout in ("tp2", "tp2_sp"):
            ours, theirs = rank[f"{layout}_chunked"], rank[f"{layout}_megatron"]
            torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=1e-5, atol=1e-6)
            assert ours["grads"].keys() == theirs["grads"].keys()
            for name, grad in ours["grads"].items():
                torch.testing.assert_close(grad, theirs["grads"][name], rtol=1e-5, atol=1e-6, msg=f"{layout} {name}")
