"""The side effects: write a job directory, run the local script, call sbatch, chain a pipeline."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from launchers.config import cluster_yaml
from launchers.plan import JobPlan
from launchers.scripts import local_script, pipeline_submit_script, sbatch_script
from steerlm.config import save_resolved

log = logging.getLogger(__name__)

SBATCH_SCRIPT = "job.sbatch"
LOCAL_SCRIPT = "run.sh"


class SubmitError(RuntimeError):
    """sbatch (or the local run) refused or failed; the message carries its stderr."""


def script_name(plan: JobPlan) -> str:
    return SBATCH_SCRIPT if plan.cluster.is_slurm else LOCAL_SCRIPT


def render(plan: JobPlan) -> str:
    return sbatch_script(plan) if plan.cluster.is_slurm else local_script(plan)


def write_job_dir(plan: JobPlan) -> Path:
    """config.yaml (the recipe's resolved config), cluster.yaml and the script; returns the script's path."""
    plan.job_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(plan.config, plan.job_dir / "config.yaml")
    (plan.job_dir / "cluster.yaml").write_text(cluster_yaml(plan.cluster))
    script = plan.job_dir / script_name(plan)
    script.write_text(render(plan))
    script.chmod(0o755)
    return script


def run_local(plan: JobPlan) -> int:
    """Write the job dir and run its run.sh in the foreground; returns the exit code."""
    script = write_job_dir(plan)
    log.info("running %s", script)
    return subprocess.run(["bash", str(script)], cwd=plan.workdir).returncode


def sbatch(script: Path, workdir: Path, dependency: Optional[str] = None) -> str:
    """Submit a script; returns the job id (`sbatch --parsable` prints `id` or `id;cluster`)."""
    command = ["sbatch", "--parsable"]
    if dependency:
        command += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    try:
        done = subprocess.run([*command, str(script)], cwd=workdir, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SubmitError(
            f"sbatch is not installed here; submit from a Slurm login node (the script is {script})"
        ) from None
    if done.returncode:
        raise SubmitError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def submit_job(plan: JobPlan) -> str:
    job_id = sbatch(write_job_dir(plan), plan.workdir)
    (plan.job_dir / "job_id").write_text(job_id + "\n")
    return job_id


def submit_pipeline(name: str, plans: Sequence[tuple[str, JobPlan]], job_root: Path) -> dict[str, str]:
    """Submit the stages in order, each afterok the previous; on a refusal cancel what was submitted."""
    scripts = [(stage, plan, write_job_dir(plan)) for stage, plan in plans]
    job_root.mkdir(parents=True, exist_ok=True)
    submit_sh = job_root / "submit.sh"
    submit_sh.write_text(pipeline_submit_script(name, plans, SBATCH_SCRIPT))
    submit_sh.chmod(0o755)
    job_ids: dict[str, str] = {}
    previous = None
    for stage, plan, script in scripts:
        try:
            previous = sbatch(script, plan.workdir, previous)
        except SubmitError:
            if job_ids:
                subprocess.run(["scancel", *job_ids.values()], capture_output=True, timeout=60)
                log.error("cancelled the stages already submitted: %s", job_ids)
            raise
        job_ids[stage] = previous
        (plan.job_dir / "job_id").write_text(previous + "\n")
    (job_root / "jobs.json").write_text(json.dumps(job_ids, indent=2) + "\n")
    return job_ids
