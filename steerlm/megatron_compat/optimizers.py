"""Items 7 and 9 of `steerlm.megatron_compat` (its docstring says what each relies on): megatron's optimizers'
state, saved, resumed and read across kinds and precisions (the distributed optimizer over torch's Adam,
`TranslatedLoad`), and the torch kernels they run (`set_fused`). Imported by the package after its version check.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from typing import Any

import torch
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_items_iter
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedTensor, ShardedTensorFactory

# --- 7. distributed optimizer over torch's Adam -----------------------------------------------------------


def _distributed_over_torch_adam(optimizer) -> list:
    """The megatron DistributedOptimizers in `optimizer` (chained or not) that drive a torch Adam/AdamW (none
    when megatron runs Transformer Engine's or apex's fused Adam, which keep `step` in their param groups)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [
        part
        for part in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(part, distrib_optimizer.DistributedOptimizer)
        and isinstance(part.optimizer, (torch.optim.Adam, torch.optim.AdamW))  # AdamW is no Adam before torch 2.6
    ]


def complete_torch_adam_state(optimizer) -> None:
    """Give every parameter of a distributed optimizer's torch Adam the state Adam creates at its first step
    (`step` 0, zero moments) where it has none yet — the same numbers, since Adam would create exactly these.
    Call before `optimizer.sharded_state_dict`: megatron's `DistributedOptimizer.state_dict` takes the one
    `step` value of the per-parameter states and fails on a run that has not stepped (always so when a
    checkpoint is being loaded into a fresh optimizer)."""
    for distributed in _distributed_over_torch_adam(optimizer):
        adam = distributed.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state["step"] = _initial_step(group, param)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


@contextlib.contextmanager
def _step_left_out_of_parameter_loads(distributed) -> Any:
    """Wrap this DistributedOptimizer's `_set_main_param_and_optimizer_states` (private; called per parameter
    by every checkpoint format's load) so it copies the loaded master weight and moments but leaves torch
    Adam's `step` to `load_state_dict`, which sets it from the param groups."""
    original = distributed._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group_index, group_order = distributed.model_param_group_index_map[model_param]
        state = distributed.optimizer.state[distributed.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    distributed._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        del distributed._set_main_param_and_optimizer_states  # the class's method again


def is_distributed_optimizer(optimizer) -> bool:
    """Whether megatron's `optimizer` (chained or not) is a DistributedOptimizer."""
    from megatron.core.optimizer import distrib_optimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, distrib_optimizer.DistributedOptimizer) for part in parts)


def saved_by_distributed_optimizer(saved: dict) -> bool:
    """Whether a checkpoint's common optimizer state (`dist_checkpointing.load_common_state_dict(…)["optimizer"]`)
    is a DistributedOptimizer's: its `sharded_state_dict` records `param_state_sharding_type` (per part, when
    chained); a plain optimizer's holds torch's `state` and `param_groups`."""

    def records(state: Any) -> bool:
        return isinstance(state, dict) and (
            "param_state_sharding_type" in state or any(records(value) for value in state.values())
        )

    return records(saved)


_STATE_KEY = re.compile(r"^((?:chained_\d+\.)?optimizer\.state\.)([A-Za-z0-9_]+)\.(.+)$")


def _parts(state: Any, count: int) -> list:
    """One state dict per part of a (chained) optimizer: megatron stores a lone part's as the whole."""
    return [state] if count == 1 else [state[index] for index in range(count)]


def _torch_state(part: dict) -> dict:
    """The torch optimizer's state dict within a part's: mixed-precision and distributed optimizers keep it under
    `optimizer`, a plain fp32 one's is the part's own."""
    return part.get("optimizer", part)


def _master_key(part: dict, distributed: bool) -> str | None:
    """The state key of an optimizer's fp32 master weights in a checkpoint (`part`: one part's state dict): the
    distributed optimizer's `param`, a plain mixed-precision one's `fp32_param` (its parts hold `optimizer`); none
    for a plain fp32 one, whose master weights are the weights themselves."""
    if distributed:
        return "param"
    return "fp32_param" if "optimizer" in part else None


def _group_identity(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys)


def _placement(item: Any) -> tuple:
    """Where a model parameter's sharded item lies in the checkpoint: its key and its offset (a factory, SwiGLU's
    fc1, holds the offset in its build function). An optimizer's item of that parameter keeps the placement under
    another key."""
    return (item.key, id(item.build_fn)) if isinstance(item, ShardedTensorFactory) else (item.key, item.global_offset)


def _saved_step(saved: dict) -> float:
    """The step of a checkpoint's torch optimizer state: in its param groups (the distributed optimizer's, or a
    Transformer Engine / apex fused Adam's), else a plain torch Adam's `state.common_step` (left out when 0)."""
    first = saved["param_groups"][0]
    return float(first["step"] if "step" in first else saved.get("state", {}).get("common_step", 0))


def _split(key: str) -> tuple[str, str, str]:
    """An optimizer item's key: its prefix, its state key (`exp_avg`, `param`, ...) and its parameter's key."""
    match = _STATE_KEY.match(key)
    if match is None:
        raise ValueError(f"unexpected optimizer state key {key!r}")
    return match.group(1), match.group(2), match.group(3)


def _in_fp32(item: Any) -> Any:
    """A model item that reads its tensor in fp32 (into a buffer of its own) whatever the parameter's dtype."""
    if item.data.dtype == torch.float32:
        return item
    buffer = torch.empty_like(item.data, dtype=torch.float32)
    if isinstance(item, ShardedTensorFactory):
        return replace(item, data=buffer)
    return replace(item, data=buffer, dtype=torch.float32)


class TranslatedLoad:
    """Reads a checkpoint whose optimizer state another kind of megatron optimizer or another precision laid out:
    distributed into plain or plain into distributed, fp32 into bf16 or back. A run can so switch
    `parallel.use_distributed_optimizer` or `precision.dtype` when it resumes, e.g. to the distributed optimizer
    when it moves to more data-parallel ranks to fit. megatron's own load of such a checkpoint fails on a missing
    key, or (plain bf16 into plain fp32) reads the bf16 weights instead of their fp32 master copy.

    Every layout stores each parameter's Adam moments at the parameter's full shape under the same keys. They
    differ in three places:
    - the fp32 master weights (`_master_key`): `optimizer.state.param.<p>` (distributed),
      `optimizer.state.fp32_param.<p>` (plain bf16), or none (plain fp32: the weights are the master weights). A
      run that keeps none reads its weights from the checkpoint's master weights; a run that keeps them, from a
      checkpoint that has none, reads them from its fp32 weights;
    - the step: in each param group (distributed, or a fused Adam's), or in `state.common_step` (plain torch Adam,
      which keeps a step per parameter);
    - where torch's param groups sit in the common state.

    `own` is this optimizer's sharded state dict for loading; `saved` the checkpoint's common optimizer state.
    `model` holds the model's sharded state dicts by their request keys: their items are redirected where the
    weights or the master weights come from the other. `request` lists what to read for `own`: its sharded items
    under the checkpoint's keys. `state` turns what was read into this optimizer's `load_state_dict` input."""

    def __init__(self, optimizer, own: dict, saved: dict, model: dict[str, dict]) -> None:
        self.parts = getattr(optimizer, "chained_optimizers", [optimizer])
        self.count = len(self.parts)
        self.distributed = is_distributed_optimizer(optimizer)
        self.own, self.saved = own, saved
        self.ours_master = _master_key(_parts(own, self.count)[0], self.distributed)
        self.saved_master = _master_key(_parts(saved, self.count)[0], saved_by_distributed_optimizer(saved))
        self.read: list[tuple[dict | list, Any]] = []  # where in `own` each requested item's value goes
        self.from_weights: list[tuple[dict | list, Any, str, str]] = []  # …and each value read as a model weight's
        self.request: list = []
        trained: dict[tuple, str] = {}  # a trained parameter's placement → its optimizer items' key prefix
        weights = {
            _placement(item): (key, name)
            for key, state in model.items()
            for name, item in state.items()
            if isinstance(item, (ShardedTensor, ShardedTensorFactory))
        }
        for container, slot, item in nested_items_iter(own):
            if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                continue
            prefix, state_key, param = _split(item.key)
            trained[(param, _placement(item)[1])] = prefix
            if state_key == self.ours_master:
                if self.saved_master is None:  # the checkpoint's fp32 weights are its master weights
                    key, name = weights[(param, _placement(item)[1])]
                    model[key][name] = _in_fp32(model[key][name])
                    self.from_weights.append((container, slot, key, name))
                    continue
                state_key = self.saved_master
            self.read.append((container, slot))
            self.request.append(replace(item, key=f"{prefix}{state_key}.{param}"))
        if self.ours_master is None and self.saved_master is not None:  # the weights from the master weights
            for placement, prefix in trained.items():
                key, name = weights[placement]
                model[key][name] = replace(model[key][name], key=f"{prefix}{self.saved_master}.{placement[0]}")

    def describe(self) -> str:
        """Both layouts, for the log: the kinds and where each keeps its fp32 master weights."""

        def layout(distributed: bool, master: str | None) -> str:
            kind = "the distributed optimizer" if distributed else "a plain optimizer"
            return f"{kind} ({f'master weights in {master}' if master else 'the weights as master weights'})"

        saved = layout(saved_by_distributed_optimizer(self.saved), self.saved_master)
        return f"saved by {saved}, read into {layout(self.distributed, self.ours_master)}"

    @staticmethod
    def needed(optimizer, own: dict, saved: dict) -> bool:
        """Whether the checkpoint's optimizer state (`saved`, its common part) is laid out otherwise than this
        optimizer's (`own`, its sharded state dict): another kind, or the master weights elsewhere."""
        count = len(getattr(optimizer, "chained_optimizers", [optimizer]))
        ours, theirs = is_distributed_optimizer(optimizer), saved_by_distributed_optimizer(saved)
        masters = _master_key(_parts(own, count)[0], ours), _master_key(_parts(saved, count)[0], theirs)
        return ours != theirs or masters[0] != masters[1]

    def state(self, loaded: dict, read: list) -> dict:
        """This optimizer's `load_state_dict` input from the tensors `request` read (`read`) and the model's loaded
        state dicts (`loaded`, by request key)."""
        for (container, slot), value in zip(self.read, read, strict=True):
            container[slot] = value
        for container, slot, key, name in self.from_weights:
            container[slot] = loaded[key][name].detach().clone()
        dict_list_map_inplace(lambda x: x.unwrap() if isinstance(x, LocalNonpersistentObject) else x, self.own)
        for part, own, saved in zip(self.parts, _parts(self.own, self.count), _parts(self.saved, self.count)):
            own_torch, saved_torch = _torch_state(own), _torch_state(saved)
            step = _saved_step(saved_torch)
            per_parameter = isinstance(part.optimizer, (torch.optim.Adam, torch.optim.AdamW))  # not a fused Adam
            groups = {_group_identity(group): group for group in saved_torch["param_groups"]}
            own_groups = []
            for group in own_torch["param_groups"]:
                if _group_identity(group) not in groups:
                    raise ValueError(f"the checkpoint's optimizer has no param group {_group_identity(group)}")
                ours = {key: value for key, value in groups[_group_identity(group)].items() if key != "step"}
                if not self.distributed:
                    ours["params"] = group["params"]
                if self.distributed or not per_parameter:
                    ours["step"] = step if per_parameter else int(step)
                own_groups.append(ours)
            own_torch["param_groups"] = own_groups
            if not self.distributed and per_parameter:
                own_torch["state"]["common_step"] = torch.tensor(step, dtype=torch.float32)
            if "grad_scaler" in saved:
                own["grad_scaler"] = saved["grad_scaler"]
        return self.own


def load_optimizer_state(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` (any megatron optimizer), made to work for distributed optimizers
    over torch Adam: the per-parameter loads leave `step` alone, and afterwards every parameter gets its own
    `step` tensor — torch Adam increments each in place, so the one tensor megatron shares would advance once
    per parameter per step and change every later bias correction."""
    distributed = _distributed_over_torch_adam(optimizer)
    with contextlib.ExitStack() as stack:
        for part in distributed:
            stack.enter_context(_step_left_out_of_parameter_loads(part))
        optimizer.load_state_dict(state)
    for part in distributed:
        for param_state in part.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()
    for torch_optimizer in _torch_optimizers(optimizer):  # the configured kernels, not the checkpoint's
        _set_fused(torch_optimizer, bool(torch_optimizer.defaults.get("fused")))


def _step_device(group: dict, param: torch.Tensor) -> torch.device:
    """Where torch Adam keeps a parameter's `step`: on the parameter's device for the fused (and capturable)
    kernels, on the CPU otherwise."""
    return param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def _initial_step(group: dict, param: torch.Tensor) -> torch.Tensor:
    """The `step` torch Adam creates at a parameter's first step."""
    return torch.zeros((), dtype=torch.float32, device=_step_device(group, param))


# --- 9. fused torch optimizers ----------------------------------------------------------------------------

_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers megatron's optimizer (chained or not) drives, where torch has a fused kernel for them
    (not Transformer Engine's or apex's FusedAdam, fused already)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part.optimizer for part in parts if isinstance(part.optimizer, _FUSABLE)]


def _set_fused(torch_optimizer: torch.optim.Optimizer, fused: bool) -> None:
    for group in [torch_optimizer.defaults, *torch_optimizer.param_groups]:
        group["fused"] = fused
        group["foreach"] = False if fused else None  # torch refuses both; None: torch's own choice
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            state = torch_optimizer.state.get(param)
            if state and "step" in state:  # where the kernel now in use keeps it
                state["step"] = state["step"].to(_step_device(group, param), torch.float32)


def set_fused(optimizer, fused: bool) -> None:
    """Run the torch optimizers inside megatron's `optimizer` with torch's fused kernels (`fused`) or its
    default ones. Fused Adam makes one pass over parameters, gradients and moments
    where the default makes several (52M parameters, 2 CPU cores: 40 instead of 242 ms a step) and is HF
    Trainer's default (`adamw_torch_fused`); its numbers differ from the default's in the last bits. Set
    again after every state-dict load (`load_optimizer_state`), which would restore the checkpoint's flags."""
    for torch_optimizer in _torch_optimizers(optimizer):
        _set_fused(torch_optimizer, fused)
