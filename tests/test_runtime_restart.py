"""A recipe of several phases (the bootstrap: sample, label, fine-tune) starts and stops the process groups once per
phase. Under torchrun the rendezvous store is the launcher's and outlives each group; a group started again with
the last one's keys waited forever (the bootstrap at any multi-process layout hung at its second phase)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.recipe_runner import ROOT, TORCHRUN_2, recipe_env

# Each rank writes its lines to a file of its own (torchrun interleaves the ranks' stdout).
PHASES = """
import sys
from pathlib import Path
import torch, torch.distributed as dist
from steerlm import runtime
from steerlm.config import ParallelConfig

lines = []
for phase, parallel in enumerate([ParallelConfig(pipeline_model_parallel_size=2), ParallelConfig(), ParallelConfig()]):
    layout = runtime.initialize(parallel, 0)
    value = torch.tensor([float(layout.rank + 1 + phase)])
    dist.all_reduce(value)
    lines.append(f"phase {phase} rank {layout.rank} pp {layout.pp} sum {value.item():g}")
    runtime.shutdown()
Path(sys.argv[1], f"rank{layout.rank}.txt").write_text("\\n".join(lines))
"""


@pytest.mark.slow
def test_every_phase_starts_its_process_groups_again_under_torchrun(tmp_path: Path) -> None:
    script = tmp_path / "phases.py"
    script.write_text(PHASES)
    result = subprocess.run(
        [*TORCHRUN_2, str(script), str(tmp_path)],
        cwd=ROOT,
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for rank in range(2) for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines())
    assert lines == [
        f"phase {phase} rank {rank} pp {2 if phase == 0 else 1} sum {3 + 2 * phase}"
        for phase in range(3)
        for rank in range(2)
    ]
