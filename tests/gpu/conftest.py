"""GPU-test fixtures: the CPU (gloo) reference runs that GPU runs are compared with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cpu_reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cpu") / "reference.pt"
    script = (
        "import sys, torch; from tests.multiproc import run_distributed; "
        "from tests.parity_scenarios import REFERENCES, run_all; "
        "torch.save(run_distributed(run_all, 1, REFERENCES)[0], sys.argv[1])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=ROOT, check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    return torch.load(out, weights_only=False)
