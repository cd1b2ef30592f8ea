"""No rank outlives what started it (steerlm.runtime.lifetime): torchrun starts its workers in sessions of their own,
so a `kill -9` of the agent left a rank running on, writing beside the rerun's ranks (found killing the knowledge
route's annotation, 2026-12-06). A rank now initialises with a parent-death signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RANK = """
import os, sys, time
from steerlm import runtime
from steerlm.config import ParallelConfig
runtime.initialize(ParallelConfig(), seed=0)
print("ready", os.getpid(), flush=True)
time.sleep(float(sys.argv[1]))
"""


def _gone(pid: int) -> bool:
    """The process ended (or is a zombie no one reaped yet: it runs nothing)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" in status.read_text()
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux prctl")
def test_a_rank_ends_when_torchrun_s_agent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen([*command, "600"], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    rank = None
    try:
        line = agent.stdout.readline() if agent.stdout else ""
        assert line.startswith("ready"), line
        rank = int(line.split()[1])
        # in a session of its own: a kill of the agent's process group does not reach it
        assert not _gone(rank) and os.getsid(rank) != os.getsid(agent.pid)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 30
        while not _gone(rank) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(rank), "the rank outlived torchrun's agent"
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
        if rank is not None and not _gone(rank):  # a failed run leaves nothing behind
            os.kill(rank, signal.SIGKILL)
