"""ParallelLayout: the one object that knows how this process sits in the parallel world."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes, this rank's coordinates and the process groups, built once by `runtime.initialize`.

    Models, losses and data receive this (or its `pg_collection`) as an argument; nothing below
    `steerlm.runtime` asks megatron's global parallel_state.
    """

    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    cp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    device: torch.device
    backend: str
    sequence_parallel: bool
    pg_collection: ProcessGroupCollection

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def uses_cpu(self) -> bool:
        return self.device.type == "cpu"

    def describe(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return (
            f"world={self.world_size} tp={self.tp} pp={self.pp}{vpp} cp={self.cp} dp={self.dp} "
            f"backend={self.backend} device={self.device.type}"
        )
