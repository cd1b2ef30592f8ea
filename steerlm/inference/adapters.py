"""Several LoRA adapters of the served model at once, each row of a batch with its own (`AdapterBank`).

A team may fine-tune its own adapters on the served model (a steerlm LoRA run with `lora.checkpoint=adapters`, or a
NeMo LoRA archive imported on it): a server profile names them (`profiles.<name>.adapter`) and that profile's rows
compute W x + scale B (A x) for each adapted linear layer while the other rows of the same batch compute W x. The
bank holds, per layer and linear, every adapter's A stacked `[adapters + 1, rank, in]` and B scaled `[adapters + 1,
out, rank]` at this rank's shards (A and B split as training splits them); index 0 is the served model itself (zeros),
ranks below the largest and linears an adapter leaves alone are zero-padded, which adds exactly nothing. An adapted
row's update is two batched products with its own matrices (`AdapterBank.add`), computed for the rows that have an
adapter only (`AdapterRows`); a row-parallel layer's partial update joins the
layer's own partial sum before the tensor-parallel reduction (B is the same on every rank, so the sum of x_r A_r B
is (sum of x_r A_r) B).

An adapter checkpoint must hold the adapters alone (it names its base) and its base must be the served checkpoint
(the same format and fingerprint): anything else is refused, naming the profile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steerlm.checkpoint.sharded import check_compatible, load_adapters, read_meta, resolve_checkpoint, unwrap
from steerlm.checkpoint.sources import WeightFormat, fingerprint
from steerlm.config.lora import LORA_TARGETS
from steerlm.config.schema import ModelConfig
from steerlm.config.sources import is_nemo_archive
from steerlm.errors import ConfigError
from steerlm.models import lora
from steerlm.runtime.layout import ParallelLayout

Key = tuple[int, str]  # (layer index, linear: linear_qkv | linear_proj | linear_fc1 | linear_fc2)


@dataclass
class AdapterBank:
    """Adapters by index (1 …; 0 is none): `names[i - 1]` is adapter i's checkpoint."""

    names: list[str] = field(default_factory=list)
    a: dict[Key, torch.Tensor] = field(default_factory=dict)  # [adapters + 1, rank, in (local)]
    b: dict[Key, torch.Tensor] = field(default_factory=dict)  # [adapters + 1, out (local), rank], scale folded in

    def add(self, out: torch.Tensor, x: torch.Tensor, layer: int, linear: str, rows: AdapterRows) -> torch.Tensor:
        """`out` (`linear` of `layer` applied to `x` [batch, n, in]) plus each adapted row's update."""
        a = self.a.get((layer, linear))
        if a is None:  # no adapter touches this linear
            return out
        b = self.b[(layer, linear)]
        picked = x if rows.index is None else x.index_select(0, rows.index)
        low = torch.bmm(picked, a.index_select(0, rows.adapters).transpose(1, 2))  # [adapted rows, n, rank]
        delta = torch.bmm(low, b.index_select(0, rows.adapters).transpose(1, 2))  # [adapted rows, n, out]
        return out + delta if rows.index is None else out.index_add(0, rows.index, delta)


@dataclass(frozen=True)
class AdapterRows:
    """The rows of a batch that run an adapter: their places in the batch (None: every row) and their adapters.
    Only those rows run the adapters' products, so the served model's rows beside a team's skip them."""

    index: torch.Tensor | None
    adapters: torch.Tensor

    @staticmethod
    def of(rows: torch.Tensor) -> AdapterRows | None:
        """From each row's adapter (0: the model alone); None when no row has one."""
        adapted = rows != 0
        if not bool(adapted.any()):
            return None
        if bool(adapted.all()):
            return AdapterRows(None, rows)
        index = adapted.nonzero().squeeze(1)
        return AdapterRows(index, rows.index_select(0, index))


def check_adapter_base(key: str, adapter: Path, served: Path) -> None:
    """Refuse an adapter checkpoint that does not hold adapters alone on the served checkpoint (ConfigError naming
    `key`)."""
    meta = read_meta(adapter)
    if meta.lora is None or meta.base is None:
        what = "holds no LoRA adapters" if meta.lora is None else "holds its frozen weights too (lora.checkpoint=full)"
        raise ConfigError(
            key,
            str(adapter),
            what,
            "name a checkpoint of LoRA adapters alone (lora.checkpoint=adapters, or a NeMo LoRA archive imported with "
            "recipes/convert.py base=…), trained on the served checkpoint",
        )
    served_format = WeightFormat.nemo if is_nemo_archive(served) else WeightFormat.steerlm
    if meta.base["format"] != served_format.value or meta.base["fingerprint"] != fingerprint(served_format, served):
        raise ConfigError(
            key,
            str(adapter),
            f"adapts {meta.base['path']} ({meta.base['format']}), not the served checkpoint {served}",
            f"serve checkpoint={meta.base['path']}, or name adapters trained on {served}",
        )


def check_adapters(adapters: Mapping[str, str], served: Path, model: ModelConfig) -> dict[str, Path]:
    """Each profile's adapter checkpoint (profile → path as configured), resolved and checked against the served
    checkpoint before anything is loaded; ConfigError naming `profiles.<name>.adapter`."""
    paths = {}
    for profile, path in adapters.items():
        key = f"profiles.{profile}.adapter"
        try:
            paths[profile] = resolve_checkpoint(path)
        except FileNotFoundError as error:
            raise ConfigError(
                key, path, str(error).split("; ")[0], "name a LoRA run's output_dir or checkpoint"
            ) from None
        check_adapter_base(key, paths[profile], served)
        try:
            check_compatible(paths[profile], model)
        except ConfigError as error:  # names the model field; the profile is what to fix
            raise ConfigError(key, path, error.problem, "name adapters trained on the served checkpoint") from None
    return paths


@torch.no_grad()
def load_adapter_bank(
    paths: Mapping[str, Path], chunks: list, layout: ParallelLayout, model_cfg: ModelConfig, verify: bool
) -> tuple[AdapterBank, dict[str, int]]:
    """Collective: the bank of the adapter checkpoints `paths` names (profile → `check_adapters`' path) on the
    served `chunks`, and each profile's adapter index. Each distinct checkpoint is loaded once: attached to the
    served model, read, copied into the bank and taken off again."""
    distinct = list(dict.fromkeys(paths.values()))
    models = [unwrap(chunk) for chunk in chunks]
    loaded: list[dict[Key, tuple[torch.Tensor, torch.Tensor]]] = []
    for path in distinct:
        load_adapters(path, models, layout, model_cfg, verify)
        names = {id(linear): name for name, linear in lora.target_linears(models[0], list(LORA_TARGETS))}
        taken, _ = lora.detach(models)
        own = {}
        for item in taken:
            parts = names[id(item.linear)].split(".")
            own[(int(parts[2]), parts[-1])] = (item.a.detach().clone(), (item.scale * item.b).detach().clone())
        loaded.append(own)
    bank = AdapterBank([str(path) for path in distinct])
    for key in sorted({key for own in loaded for key in own}):
        first = next(own[key][0] for own in loaded if key in own)  # every adapter's A of `key` has its input width
        rank = max(own[key][0].shape[0] for own in loaded if key in own)
        out = next(own[key][1] for own in loaded if key in own).shape[0]
        a = first.new_zeros(len(distinct) + 1, rank, first.shape[1])
        b = first.new_zeros(len(distinct) + 1, out, rank)
        for index, own in enumerate(loaded, start=1):
            if key in own:
                own_a, own_b = own[key]
                a[index, : own_a.shape[0]], b[index, :, : own_b.shape[1]] = own_a, own_b
        bank.a[key], bank.b[key] = a, b
    return bank, {profile: distinct.index(path) + 1 for profile, path in paths.items()}
