"""A stage's CPU threads raised while it runs (steerlm/runtime/threads.py), the pipeline's wave that raises
them when a wave-mate ends (steerlm.stages.pipeline.run_wave), and a replicable stage's share run as one-thread
replicas. That the weights do not depend on when the count changes: tests/test_pipeline.py."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm.errors import ConfigError
from steerlm.runtime.threads import THREADS_FILE, ThreadShare, read_share, write_share
from steerlm.stages import pipeline
from steerlm.stages.pipeline import Paths, Step, run_wave


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_share_file_sets_the_thread_count_when_it_changes(tmp_path: Path, restore_threads) -> None:
    path = tmp_path / "stage.threads"
    share = ThreadShare(path, every=0.0)
    assert share.poll() is None, "no file yet: nothing to follow"
    torch.set_num_threads(1)
    write_share(path, 1)
    assert share.poll() is None and torch.get_num_threads() == 1
    write_share(path, 2)
    assert share.poll() == 2 and torch.get_num_threads() == 2
    assert share.poll() is None
    assert [p.name for p in tmp_path.iterdir()] == ["stage.threads"], "no partial file left behind"


def test_the_file_is_read_at_most_once_per_interval(tmp_path: Path, restore_threads) -> None:
    path = tmp_path / "stage.threads"
    torch.set_num_threads(1)
    write_share(path, 1)
    share = ThreadShare(path, every=3600.0)
    assert share.poll() is None
    write_share(path, 2)
    assert share.poll() is None and torch.get_num_threads() == 1, "read again only after `every` seconds"


def test_a_bad_share_names_the_variable_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "stage.threads"
    for text in ("two", "0", "-1", ""):
        path.write_text(text)
        with pytest.raises(ConfigError) as error:
            read_share(path)
        assert error.value.key == THREADS_FILE and str(path) in str(error.value)


def test_from_environment_follows_the_named_file_or_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(THREADS_FILE, raising=False)
    assert ThreadShare.from_environment().path is None
    monkeypatch.setenv(THREADS_FILE, str(tmp_path / "x.threads"))
    assert ThreadShare.from_environment().path == tmp_path / "x.threads"


# A stand-in recipe: "short" ends at once; "long" follows its share file until it is given 2 threads (or 60 s
# pass) and writes the thread count it ends with to its result.
PROBE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from steerlm.runtime.threads import ThreadShare

    result, mode = Path(sys.argv[1]), sys.argv[2]
    started = torch.get_num_threads()
    share = ThreadShare.from_environment(); share.every = 0.0
    deadline = time.monotonic() + 60
    while mode == "long" and torch.get_num_threads() < 2 and time.monotonic() < deadline:
        share.poll()
        time.sleep(0.05)
    result.write_text(json.dumps({"started": started, "ended": torch.get_num_threads()}))
    """
)


def _steps(tmp_path: Path, monkeypatch) -> tuple[Paths, Step, Step]:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "probe.py").write_text(PROBE)
    monkeypatch.setattr(pipeline, "RECIPES_DIR", recipes)
    out = Paths(tmp_path / "run")
    short = Step("short", "probe", (str(out.root / "short.json"), "short"), out.root / "short.json")
    long = Step("long", "probe", (str(out.root / "long.json"), "long"), out.root / "long.json")
    return out, short, long


def test_a_wave_gives_the_threads_a_finished_stage_frees_to_the_one_still_running(tmp_path: Path, monkeypatch) -> None:
    out, short, long = _steps(tmp_path, monkeypatch)
    outcome, shares = run_wave([short, long], out, threads=2)
    assert all(isinstance(seconds, float) for seconds in outcome.values()), outcome
    assert shares == {"short": [1], "long": [1, 2]}
    assert json.loads(long.result.read_text()) == {"started": 1, "ended": 2}
    assert json.loads(short.result.read_text()) == {"started": 1, "ended": 1}
    assert (out.root / ".pipeline" / "long.threads").read_text() == "2\n"


def test_a_stage_found_complete_leaves_its_share_to_the_others_at_once(tmp_path: Path, monkeypatch) -> None:
    out, short, long = _steps(tmp_path, monkeypatch)
    assert run_wave([short], out, threads=1)[0]["short"] is not None
    outcome, shares = run_wave([short, long], out, threads=2)
    assert outcome["short"] is None, "complete: not run again"
    assert shares == {"long": [1, 2]}
    assert json.loads(long.result.read_text())["ended"] == 2


# A stand-in for a replicable stage (annotate): each process writes its rank, the ranks and its threads.
REPLICA = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch

    result, rank = Path(sys.argv[1]), int(os.environ.get("RANK", "0"))
    seen = {"ranks": int(os.environ.get("WORLD_SIZE", "1")), "threads": torch.get_num_threads()}
    Path(f"{result}.{rank}").write_text(json.dumps(seen))
    if rank == 0:
        result.write_text("{}")
    """
)


def test_a_replicable_stage_runs_its_share_as_one_thread_replicas_and_resumes_at_any_share(
    tmp_path: Path, monkeypatch
) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "replica.py").write_text(REPLICA)
    monkeypatch.setattr(pipeline, "RECIPES_DIR", recipes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = Paths(tmp_path / "run")
    result = out.root / "labels.json"
    stage = Step("labels", "replica", (str(result),), result, replicable=True)
    assert stage.replicas(2, cuda=False) == 2 and stage.replicas(1, cuda=False) == 1
    assert stage.replicas(2, cuda=True) == 1, "on GPUs a replica would need a device of its own"
    assert replace(stage, replicable=False).replicas(2, cuda=False) == 1
    outcome, shares = run_wave([stage], out, threads=2)
    assert isinstance(outcome["labels"], float), outcome
    assert shares == {"labels": [2]}
    seen = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in (0, 1)]
    assert seen == [{"ranks": 2, "threads": 1}] * 2
    assert json.loads((out.root / ".pipeline" / "labels.json").read_text())["processes"] == 1
    outcome, _ = run_wave([stage], out, threads=1)  # the replicas are not part of the recorded command
    assert outcome == {"labels": None}
