"""A stage's CPU threads raised while it runs (steerlm/runtime/threads.py), the pipeline's scheduler that starts
a stage once its needs are complete and raises the others when a stage ends (steerlm.stages.pipeline.run_stages),
and a replicable stage's share run as one-thread replicas. That the weights do not depend on when the count
changes: tests/test_pipeline.py."""

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
from steerlm.stages.pipeline import Paths, Step, run_stages


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
# pass) and writes the thread count it ends with to its result, and when it began and ended.
PROBE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    from steerlm.runtime.threads import ThreadShare

    result, mode = Path(sys.argv[1]), sys.argv[2]
    began, started = time.time(), torch.get_num_threads()
    share = ThreadShare.from_environment(); share.every = 0.0
    deadline = time.monotonic() + 60
    while mode == "long" and torch.get_num_threads() < 2 and time.monotonic() < deadline:
        share.poll()
        time.sleep(0.05)
    seen = {"started": started, "ended": torch.get_num_threads(), "began_at": began, "ended_at": time.time()}
    result.write_text(json.dumps(seen))
    """
)


def _probe(out: Paths, name: str, mode: str, needs: tuple[str, ...] = ()) -> Step:
    return Step(name, "probe", (str(out.root / f"{name}.json"), mode), out.root / f"{name}.json", needs=needs)


def _steps(tmp_path: Path, monkeypatch) -> tuple[Paths, Step, Step]:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "probe.py").write_text(PROBE)
    monkeypatch.setattr(pipeline, "RECIPES_DIR", recipes)
    out = Paths(tmp_path / "run")
    return out, _probe(out, "short", "short"), _probe(out, "long", "long")


def _seen(step: Step) -> dict:
    return json.loads(step.result.read_text())


def test_the_threads_a_finished_stage_frees_go_to_the_one_still_running(tmp_path: Path, monkeypatch) -> None:
    out, short, long = _steps(tmp_path, monkeypatch)
    outcomes = run_stages([short, long], out, threads=2)
    assert all(isinstance(seconds, float) for seconds in outcomes.results.values()), outcomes
    assert outcomes.shares == {"short": [1], "long": [1, 2]}
    assert (_seen(long)["started"], _seen(long)["ended"]) == (1, 2)
    assert (_seen(short)["started"], _seen(short)["ended"]) == (1, 1)
    assert (out.root / ".pipeline" / "long.threads").read_text() == "2\n"


def test_a_stage_found_complete_takes_no_thread(tmp_path: Path, monkeypatch) -> None:
    out, short, long = _steps(tmp_path, monkeypatch)
    assert run_stages([short], out, threads=1).results["short"] is not None
    outcomes = run_stages([short, long], out, threads=2)
    assert outcomes.results["short"] is None, "complete: not run again"
    assert outcomes.shares == {"long": [2]}, "started with both threads"
    assert _seen(long)["ended"] == 2


def test_a_stage_starts_once_its_needs_end_and_takes_the_freed_thread_before_the_others_grow(
    tmp_path: Path, monkeypatch
) -> None:
    """`after` needs `short`, so it waits until `short` ends and then takes the thread `short` frees; `long` gets
    that thread only when `after` has ended too and nothing waits for it."""
    out, short, long = _steps(tmp_path, monkeypatch)
    after = _probe(out, "after", "short", needs=("short",))
    outcomes = run_stages([long, after, short], out, threads=2)
    assert all(isinstance(seconds, float) for seconds in outcomes.results.values()), outcomes
    assert outcomes.shares == {"short": [1], "after": [1], "long": [1, 2]}
    assert _seen(after)["began_at"] >= _seen(short)["ended_at"]
    assert _seen(long)["ended_at"] >= _seen(after)["ended_at"]


def test_one_at_a_time_each_stage_gets_every_thread_in_plan_order(tmp_path: Path, monkeypatch) -> None:
    out, short, long = _steps(tmp_path, monkeypatch)
    outcomes = run_stages([long, short], out, threads=2, concurrent=False)
    assert outcomes.shares == {"long": [2], "short": [2]}
    assert _seen(short)["began_at"] >= _seen(long)["ended_at"]


def test_a_failed_stage_starts_nothing_more_unless_keep_going_and_then_not_what_needs_it(
    tmp_path: Path, monkeypatch
) -> None:
    out, short, _ = _steps(tmp_path, monkeypatch)
    broken = Step("broken", "missing", (), out.root / "never.json")  # no such recipe: exits with status 2
    after = _probe(out, "after", "short", needs=("broken",))
    stopped = run_stages([broken, short, after], out, threads=1)
    assert isinstance(stopped.results["broken"], ConfigError) and set(stopped.results) == {"broken"}
    going = run_stages([broken, short, after], out, threads=1, keep_going=True)
    assert isinstance(going.results["short"], float) and going.skipped == ["after"]


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
    outcomes = run_stages([stage], out, threads=2)
    assert isinstance(outcomes.results["labels"], float), outcomes
    assert outcomes.shares == {"labels": [2]}
    seen = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in (0, 1)]
    assert seen == [{"ranks": 2, "threads": 1}] * 2
    assert json.loads((out.root / ".pipeline" / "labels.json").read_text())["processes"] == 1
    outcomes = run_stages([stage], out, threads=1)  # the replicas are not part of the recorded command
    assert outcomes.results == {"labels": None}
