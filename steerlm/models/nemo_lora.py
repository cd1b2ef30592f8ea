"""A NeMo 1.x LoRA archive (`megatron_gpt_peft_lora_tuning`'s `.nemo`: the adapters alone, the base model named in
its config) read as steerlm's LoRA adapters.

NeMo's `ParallelLinearAdapter` computes `linear_out(linear_in(x)) * alpha / dim`: `linear_in` is steerlm's A
(`lora_a`, rank x in), `linear_out` its B (`lora_b`, out x rank), `adapter_dim` its rank and `alpha` (NeMo's default:
`adapter_dim`) its alpha, so the update W + (alpha / rank) B A is the same. The tensors come in either of NeMo's
layouts and at any TP through `steerlm.models.nemo_weights`, which knows the adapters' partition dims. Refused,
naming the key: a PEFT scheme other than `lora`, adapters on some layers only (`layer_selection`), an activation
between A and B, adapters the config does not announce or announced ones that are missing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from steerlm.config.lora import NEMO_LORA_TARGETS, LoraCheckpoint, LoraConfig
from steerlm.errors import DataError
from steerlm.models.lora import is_adapter
from steerlm.models.nemo_archive import NemoArchive
from steerlm.models.nemo_weights import archive_weights, read_full

_LINEAR_OF = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp", "linear_fc2": "mlp"}
_DEFAULT_TARGETS = ["attention_qkv"]  # NeMo's `lora_tuning.target_modules` default


class NemoAdapters:
    """The LoRA adapters of a NeMo PEFT archive: their `LoraConfig` and full tensors by steerlm global name."""

    def __init__(self, path: str | Path, num_layers: int) -> None:
        self.archive = NemoArchive(path)
        try:
            self.config = self.archive.read_config()
            self.lora = self._lora_config()
            self._weights = archive_weights(self.archive, self.config)
            self._check_names(num_layers)
        except BaseException:
            self.archive.close()
            raise

    def _refuse(self, key: str, value, problem: str, fix: str):
        return DataError(self.archive.where("model_config.yaml"), None, key, f"{value!r} {problem}", fix)

    def _lora_config(self) -> LoraConfig:
        peft = self.config.get("peft") or {}
        scheme = peft.get("peft_scheme")
        if scheme != "lora":
            raise self._refuse(
                "peft.peft_scheme",
                scheme,
                "is not lora: the archive holds no LoRA adapters",
                "import a NeMo LoRA archive here (peft_scheme: lora), or a full model without base=",
            )
        tuning = peft.get("lora_tuning") or {}
        if tuning.get("layer_selection") is not None:
            raise self._refuse(
                "peft.lora_tuning.layer_selection",
                tuning["layer_selection"],
                "adapts some layers only; steerlm's LoRA adapts every layer",
                "import a LoRA archive trained on every layer (layer_selection: null)",
            )
        activation = tuning.get("activation", "identity")
        if activation != "identity":
            raise self._refuse(
                "peft.lora_tuning.activation",
                activation,
                "puts an activation between A and B; LoRA has none",
                "import a LoRA archive trained with activation: identity",
            )
        names = tuning.get("target_modules") or _DEFAULT_TARGETS
        unknown = [name for name in names if name not in NEMO_LORA_TARGETS]
        if unknown:
            raise self._refuse(
                "peft.lora_tuning.target_modules",
                names,
                f"names {unknown}, which steerlm does not adapt",
                f"adapters on NeMo's {sorted(NEMO_LORA_TARGETS)} import",
            )
        targets = list(dict.fromkeys(target for name in names for target in NEMO_LORA_TARGETS[name]))
        rank = int(tuning.get("adapter_dim", 32))
        alpha = float(tuning["alpha"]) if tuning.get("alpha") is not None else float(rank)
        dropout = float(tuning.get("adapter_dropout", 0.0))
        return LoraConfig(rank, alpha, dropout, targets, LoraCheckpoint.adapters)

    def names(self, num_layers: int) -> list[str]:
        """The adapters' steerlm global names the config announces, for a base of `num_layers` layers."""
        return [
            f"decoder.layers.{layer}.{_LINEAR_OF[target]}.{target}.{matrix}"
            for layer in range(num_layers)
            for target in self.lora.targets
            for matrix in ("lora_a", "lora_b")
        ]

    def _check_names(self, num_layers: int) -> None:
        held, expected = set(self._weights.index), set(self.names(num_layers))
        others = sorted(name for name in held if not is_adapter(name))
        if others:
            raise DataError(
                str(self.archive.path),
                None,
                None,
                f"holds model weights ({', '.join(others[:3])}) beside adapters",
                "import a full model without base=; pass the LoRA archive of NeMo's PEFT training with base=",
            )
        for problem, names in (("has no tensor for", expected - held), ("holds", held - expected)):
            if names:
                detail = "" if problem == "has no tensor for" else ", which its peft.lora_tuning does not announce"
                raise DataError(
                    str(self.archive.path),
                    None,
                    None,
                    f"{problem} {', '.join(sorted(names)[:4])}{detail}",
                    f"check the archive's peft.lora_tuning.target_modules and that its base has {num_layers} layers",
                )

    def full_tensors(self, names: list[str], gated: bool) -> dict[str, torch.Tensor]:
        """Full adapter tensors by steerlm global name; `gated`: the base's fc1 is SwiGLU's (B's TP slices
        `[gate_r; up_r]`)."""
        return read_full(self._weights, names, gated)

    def close(self) -> None:
        self.archive.close()

    def __enter__(self) -> NemoAdapters:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
