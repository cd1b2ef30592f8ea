"""launchers: golden job scripts, world-size planning, clear errors, and a real single-node Slurm.

Golden texts live in tests/slurm/golden/; regenerate them with
`STEERLM_UPDATE_GOLDEN=1 python -m pytest tests/test_launchers.py -k golden` and review the diff.
The Slurm tests start Debian's slurmctld + slurmd + munge as root (tests/slurm_fixture.py) and skip,
with the reason, where that is impossible.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launchers import compose_cluster, local_script, plan_job, plan_world, torchrun_command
from launchers.cli import main
from launchers.config import ClusterConfig, time_limit_seconds
from launchers.pipeline import load_pipeline, split_overrides
from launchers.plan import REPO_ROOT
from launchers.submit import write_job_dir
from steerlm.config import ConfigError, ParallelConfig
from tests.slurm_fixture import SingleNodeSlurm, free_port, shellcheck_path, slurm_unavailable_reason

log = logging.getLogger(__name__)
GOLDEN = Path(__file__).parent / "slurm" / "golden"
CLUSTER_DIR = REPO_ROOT / "conf" / "cluster"
STAMP = "20260101-000000"

SCENARIOS = {
    "local_tp2.txt": ["demo", "parallel=tp2", "cluster.workdir=/home/me/steerlm", "cluster.job_dir=runs/jobs/tp2"],
    "slurm_1node_8gpus.sbatch": [
        "demo",
        "model=llama2_7b",
        "parallel=tp8",
        "precision=bf16",
        "output_dir=/lustre/steerlm/runs/llama2_7b",
        "cluster=slurm",
        "cluster.partition=batch",
        "cluster.account=steerlm",
        "cluster.qos=high",
        "cluster.cpus_per_task=96",
        "cluster.mem=0",
        "cluster.job_name=llama2-7b-demo",
        "cluster.workdir=/lustre/steerlm",
        "cluster.job_dir=runs/jobs/llama2-7b-demo",
        'cluster.setup=["source /lustre/steerlm/.venv/bin/activate"]',
        'cluster.sbatch_args=["--constraint=h100"]',
    ],
    "slurm_4nodes_pyxis.sbatch": [
        "demo",
        "model=llama2_70b",
        "parallel=tp8_pp2",
        "parallel.data_parallel_size=2",
        "precision=bf16",
        "output_dir=/workspace/steerlm/runs/llama2_70b",
        "cluster=slurm_pyxis",
        "cluster.partition=batch",
        "cluster.account=steerlm",
        "cluster.time=2-00:00:00",
        "cluster.signal_lead_seconds=900",
        "cluster.job_dir=/lustre/steerlm/runs/jobs/llama2-70b",
    ],
    "slurm_cpu.sbatch": [
        "demo",
        "parallel=tp2",
        "trainer.max_steps=100",
        "cluster=slurm_cpu",
        "cluster.partition=cpu",
        "cluster.workdir=/shared/steerlm",
        "cluster.job_dir=runs/jobs/demo-cpu",
    ],
    "pipeline_demo.txt": [
        "--pipeline",
        "demo",
        "cluster=slurm_cpu",
        "cluster.workdir=/shared/steerlm",
        "cluster.job_dir=runs/jobs/pipeline_demo",
    ],
}


def _dry_run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def _scripts(text: str) -> list[str]:
    """The separate scripts of a dry run (a pipeline prints several, each after a `# ==== path` line)."""
    parts = [part for part in text.split("# ==== ") if part.strip()]
    return [part.split("\n", 1)[1] if part.startswith("/") else part for part in parts]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_script(name: str, capsys) -> None:
    code, out, err = _dry_run(SCENARIOS[name], capsys)
    assert code == 0, err
    path = GOLDEN / name
    if os.environ.get("STEERLM_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out)
    assert out == path.read_text(), f"{name} changed; regenerate with STEERLM_UPDATE_GOLDEN=1 and review the diff"


@pytest.fixture(scope="module")
def shellcheck() -> str | None:
    return shellcheck_path()


@pytest.mark.parametrize("name", sorted(n for n in SCENARIOS if n != "local_tp2.txt"))
def test_generated_scripts_pass_bash_and_shellcheck(name: str, shellcheck: str | None, capsys, tmp_path: Path) -> None:
    code, out, err = _dry_run(SCENARIOS[name], capsys)
    assert code == 0, err
    for index, script in enumerate(_scripts(out)):
        path = tmp_path / f"{index}.sh"
        path.write_text(script)
        checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        if shellcheck:  # SC1091: the sourced venv exists on the cluster, not here
            checked = subprocess.run([shellcheck, "-e", "SC1091", str(path)], capture_output=True, text=True)
            assert checked.returncode == 0, checked.stdout + script


def test_local_run_script_passes_bash_and_shellcheck(shellcheck: str | None, tmp_path: Path) -> None:
    plan = plan_job("demo", ["parallel=tp2"], compose_cluster(["+cluster.env.OMP_NUM_THREADS=1"]), STAMP)
    path = tmp_path / "run.sh"
    path.write_text(local_script(plan))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shellcheck:
        checked = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout


def test_shellcheck_is_available(shellcheck: str | None) -> None:
    if shellcheck is None:
        pytest.skip(
            "shellcheck is not installed and could not be installed (apt-get install shellcheck); "
            "the generated scripts were checked with bash -n only"
        )


@pytest.mark.parametrize("option", sorted(path.stem for path in CLUSTER_DIR.glob("*.yaml")))
def test_every_cluster_yaml_composes_and_validates(option: str) -> None:
    cluster = compose_cluster([f"cluster={option}"])
    assert cluster.scheduler.value == ("local" if option == "local" else "slurm")
    plan = plan_job("demo", ["parallel=tp2", "trainer.micro_batch_size=1"], cluster, STAMP)
    assert plan.world.tensor == 2 and plan.world.world_size == 2 * plan.world.data


def test_shipped_pipelines_load_and_plan() -> None:
    spec = load_pipeline("demo")
    assert [stage.name for stage in spec.stages] == ["pretrain", "extend"]
    assert spec.stages[0].overrides[-1] == "output_dir=runs/pipeline_demo/lm"


def test_local_torchrun_command_from_the_config() -> None:
    plan = plan_job("demo", ["parallel=tp2_pp2"], compose_cluster(), STAMP)
    assert torchrun_command(plan) == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=4",
        "recipes/demo.py",
        "parallel=tp2_pp2",
    ]
    assert plan.job_dir == REPO_ROOT / "runs" / "jobs" / f"demo-{STAMP}"


def _parallel(tp: int = 1, pp: int = 1, dp: int | None = None) -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp)


@pytest.mark.parametrize(
    "tp,pp,dp,nodes,expected",
    [
        (8, 2, None, None, (2, 1)),  # one replica needs two 8-GPU nodes
        (2, 1, None, None, (1, 4)),  # TP=2 fills one node with 4 replicas
        (8, 2, 2, None, (4, 2)),  # dp given: exactly enough nodes
        (8, 1, None, 3, (3, 3)),  # nodes given: dp derived
    ],
)
def test_nodes_and_data_parallel_size_are_derived(tp, pp, dp, nodes, expected) -> None:
    world = plan_world(_parallel(tp, pp, dp), ClusterConfig(scheduler="slurm", gpus_per_node=8, nodes=nodes))
    assert (world.nodes, world.data) == expected and world.world_size == tp * pp * world.data


def test_cpu_jobs_take_processes_from_the_layout_or_the_knob() -> None:
    assert plan_world(_parallel(2, 2), ClusterConfig(scheduler="slurm")).processes_per_node == 4
    world = plan_world(_parallel(2), ClusterConfig(scheduler="slurm", nodes=2, processes_per_node=2))
    assert (world.world_size, world.data) == (4, 2)


@pytest.mark.parametrize(
    "tp,dp,nodes,gpus,key,words",
    [
        (8, 1, 2, 8, "cluster.nodes", "2 nodes x 8 processes = 16 processes, but"),
        (8, None, 1, 6, "cluster.nodes", "is not a multiple of tp x pp x cp = 8 x 1 x 1 = 8"),
        (8, 3, None, 16, "cluster.gpus_per_node", "do not fill whole nodes of 16"),
    ],
)
def test_world_size_mismatch_is_a_clear_error(tp, dp, nodes, gpus, key, words) -> None:
    with pytest.raises(ConfigError) as error:
        plan_world(_parallel(tp, 1, dp), ClusterConfig(scheduler="slurm", gpus_per_node=gpus, nodes=nodes))
    assert error.value.key == key and words in str(error.value) and "Fix:" in str(error.value)


@pytest.mark.parametrize(
    "argv,key,words",
    [
        (["demo", "cluster=slurm", "cluster.partiton=gpu"], "cluster.partiton", "did you mean cluster.partition?"),
        (["nosuchrecipe"], "recipe", "there is no recipes/nosuchrecipe.py"),
        (["demo", "trainer.max_stepz=3"], "trainer.max_stepz", "not in 'TrainerConfig'"),
        (["demo", "cluster=nosuchcluster"], "cluster", "nosuchcluster"),
        (
            [
                "demo",
                "parallel=tp8",
                "model=llama2_7b",
                "cluster=slurm",
                "cluster.nodes=2",
                "parallel.data_parallel_size=1",
            ],
            "cluster.nodes",
            "need 8",
        ),
        (
            ["demo", "parallel=tp8", "cluster=slurm", "cluster.gpus_per_node=8"],
            "parallel.tensor_model_parallel_size",
            "must divide model.num_attention_heads=4",
        ),
        (["demo", "cluster=slurm", "+cluster.env.HF_TOKEN=hf_abc"], "cluster.env.HF_TOKEN", "looks like a secret"),
        (
            ["demo", "cluster=slurm", "cluster.time=00:05:00", "cluster.signal_lead_seconds=300"],
            "cluster.signal_lead_seconds",
            "shorter than the time limit",
        ),
        (["demo", "cluster.partition=gpu"], "cluster.partition", "is a Slurm setting"),
        (["demo", "cluster=slurm_pyxis", "cluster.container.mounts=[/data]"], "cluster.container.mounts", "SRC:DST"),
        (["demo", "cluster=slurm", "cluster.time=soon"], "cluster.time", "is not a Slurm time limit"),
        (["demo", "cluster=slurm", "cluster.launcher=mpi"], "cluster.launcher", "expected one of [torchrun, srun]"),
        (["--pipeline", "demo"], "cluster.scheduler", "chains Slurm jobs"),
        (["--pipeline", "nosuchpipeline", "cluster=slurm"], "pipeline", "is not a shipped pipeline"),
    ],
)
def test_bad_configs_stop_with_the_key_and_a_fix(argv: list[str], key: str, words: str, capsys) -> None:
    code, out, err = _dry_run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {key}=") and words in err and "Fix:" in err, err


def test_secrets_pass_by_name_only(capsys) -> None:
    code, out, _ = _dry_run(
        ["demo", "trainer.micro_batch_size=1", "cluster=slurm_pyxis", "cluster.env_passthrough=[HF_TOKEN,'NCCL_*']"],
        capsys,
    )
    assert code == 0
    assert "grep -E '^(HF_TOKEN|NCCL_.*)$'" in out and '${passthrough:+"--container-env=$passthrough"}' in out


def test_time_limits_in_every_slurm_format() -> None:
    assert [time_limit_seconds(t) for t in ("90", "5:30", "04:00:00", "2-00", "1-02:03", "1-00:00:01")] == [
        5400,
        330,
        14400,
        172800,
        93780,
        86401,
    ]


def test_overrides_split_between_cluster_and_recipe() -> None:
    assert split_overrides(["cluster=slurm", "cluster.nodes=2", "+cluster.env.A=1", "parallel=tp2", "clusters=x"]) == (
        ["cluster=slurm", "cluster.nodes=2", "+cluster.env.A=1"],
        ["parallel=tp2", "clusters=x"],
    )


def test_job_dir_holds_the_resolved_configs_and_the_script(tmp_path: Path) -> None:
    cluster = compose_cluster(["cluster=slurm_cpu", f"cluster.job_dir={tmp_path / 'job'}"])
    plan = plan_job("demo", ["parallel=tp2", "trainer.max_steps=7"], cluster, STAMP)
    script = write_job_dir(plan)
    config = OmegaConf.load(tmp_path / "job" / "config.yaml")
    assert config.trainer.max_steps == 7 and config.parallel.tensor_model_parallel_size == 2
    assert OmegaConf.load(tmp_path / "job" / "cluster.yaml").launcher == "srun"
    assert script.name == "job.sbatch" and os.access(script, os.X_OK)
    assert "#SBATCH --ntasks-per-node=2" in script.read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_local_submit_runs_torchrun(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "demo",
            "parallel=tp2",
            "trainer.max_steps=4",
            "trainer.log_interval=2",
            "checkpoint.save_interval=null",
            f"output_dir={tmp_path / 'out'}",
            f"cluster.job_dir={tmp_path / 'job'}",
            f"cluster.python={sys.executable}",
            "+cluster.env.OMP_NUM_THREADS=1",
            "--submit",
        ]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["last_step"] == 4 and "tp=2" in summary["layout"]
    assert (
        (tmp_path / "job" / "run.sh")
        .read_text()
        .endswith(
            "recipes/demo.py parallel=tp2 trainer.max_steps=4 "
            "trainer.log_interval=2 checkpoint.save_interval=null "
            f"output_dir={tmp_path / 'out'}\n"
        )
    )


# --- a real single-node Slurm ------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="steerlm-slurm-"))
    root.chmod(0o755)  # munged runs as the munge user and must reach its socket directory
    cluster = SingleNodeSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 30
            while cluster.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for(condition, timeout: float, what: str, context) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout:.0f} s\n{context()}")


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


PIPELINE = """\
name: slurmtest
run_dir: {run_dir}
stages:
  - name: pretrain
    recipe: demo
    overrides: [parallel=tp2, trainer.max_steps=20, trainer.log_interval=5, "output_dir=${{run_dir}}/lm"]
  - name: extend
    recipe: demo
    overrides: [parallel=pp2, trainer.max_steps={extend_steps}, trainer.log_interval=1, checkpoint.save_interval=null,
                "output_dir=${{run_dir}}/lm"]
    cluster: [cluster.launcher=torchrun, cluster.cpus_per_task=2]
"""


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_pipeline_on_slurm_trains_then_checkpoints_requeues_and_resumes_on_usr1(
    slurm: SingleNodeSlurm, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Stage 1: 2 Slurm tasks (srun launcher) train at TP=2. Stage 2 (afterok, torchrun launcher, PP=2)
    continues the run; USR1 to its batch shell (what --signal=B:USR1@s sends) makes it checkpoint,
    requeue itself and resume from that checkpoint to the end."""
    extend_steps = 100
    run_dir, job_root = tmp_path / "run", tmp_path / "jobs"
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(PIPELINE.format(run_dir=run_dir, extend_steps=extend_steps))
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    code = main(
        [
            "--pipeline",
            str(spec),
            "cluster=slurm_cpu",
            f"cluster.python={sys.executable}",
            f"cluster.job_dir={job_root}",
            f"cluster.master_port={free_port()}",
            "--submit",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    jobs = json.loads((job_root / "jobs.json").read_text())
    first, second = jobs["pretrain"], jobs["extend"]
    log.info("submitted pretrain job %s and extend job %s (%s)", first, second, slurm.job(second)["Dependency"])

    def context() -> str:
        logs = [f"--- {path}\n{path.read_text(errors='replace')[-2000:]}" for path in sorted(job_root.rglob("slurm-*"))]
        return "\n".join([*logs, slurm.logs(), str(slurm.job(first)), str(slurm.job(second))])

    assert slurm.job(second)["Dependency"].startswith(f"afterok:{first}")
    info = slurm.wait_for_state(first, {"COMPLETED"}, timeout=180)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", context()
    stage1 = json.loads((run_dir / "lm" / "summary.json").read_text())
    log.info(
        "job %s %s exit %s: %s, steps %d-%d",
        first,
        info["JobState"],
        info["ExitCode"],
        stage1["layout"],
        stage1["start_step"],
        stage1["last_step"],
    )
    assert stage1["last_step"] == 20 and "world=2 tp=2" in stage1["layout"], stage1

    _wait_for(
        lambda: any(step > 20 for step in _logged_steps(run_dir / "lm")), 150, "stage 2 logged no step past 20", context
    )
    slurm.run("scancel", "--batch", "--signal=USR1", second)
    requeued = {"Restarts": "1", "JobState": "PENDING", "Reason": "BeginTime"}
    _wait_for(lambda: requeued.items() <= slurm.job(second).items(), 60, "stage 2 was not requeued", context)
    stopped_at = int((run_dir / "lm" / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    assert 20 < stopped_at < extend_steps, context()
    log.info(
        "job %s after USR1: checkpoint at step %d, %s",
        second,
        stopped_at,
        {k: slurm.job(second)[k] for k in ("JobState", "Reason", "Restarts", "EligibleTime")},
    )
    # slurmctld holds a requeued job for ~2 minutes (Reason=BeginTime); to save that wait the test releases it.
    # slurmd revokes the first run's credential with one-second resolution, so an allocation within the same
    # second as the requeue is refused ("Job credential revoked"): release it once that second has passed
    # and the node has torn the first run down.
    requeued_at = datetime.fromisoformat(slurm.job(second)["SubmitTime"])
    _wait_for(
        lambda: (
            datetime.now() >= requeued_at + timedelta(seconds=2)
            and slurm.run("sinfo", "-h", "-o", "%T").stdout.split() == ["idle"]
        ),
        60,
        "the node did not finish the requeued job's first run",
        context,
    )
    slurm.run("scontrol", "update", f"JobId={second}", "StartTime=now")
    info = slurm.wait_for_state(second, {"COMPLETED"}, timeout=240)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", context()

    final = json.loads((run_dir / "lm" / "summary.json").read_text())
    assert (final["start_step"], final["last_step"], final["stop_reason"]) == (stopped_at, extend_steps, None)
    assert "pp=2" in final["layout"]
    log.info(
        "job %s %s exit %s restarts %s: %s resumed at step %d, finished at %d",
        second,
        info["JobState"],
        info["ExitCode"],
        info["Restarts"],
        final["layout"],
        final["start_step"],
        final["last_step"],
    )
    steps = _logged_steps(run_dir / "lm")
    assert steps == sorted(set(steps)) and steps[-1] == extend_steps  # the rerun continued, nothing twice
    output = (job_root / "extend" / f"slurm-{second}.out").read_text()
    assert "USR1 received" in output and f"requeueing job {second}" in output and "(restart 1)" in output, output
