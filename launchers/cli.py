"""`python -m launchers`: render (--dry-run, the default) or run (--submit) a recipe or a pipeline.

    python -m launchers demo parallel=tp2                              # torchrun command, this machine
    python -m launchers demo parallel=tp2 cluster=local --submit       # ... and run it
    python -m launchers demo model=llama2_7b parallel=tp8 precision=bf16 cluster=slurm cluster.gpus_per_node=8
    python -m launchers --pipeline demo cluster=slurm_cpu --submit     # one job per stage, afterok-chained

Overrides naming `cluster` (`cluster=slurm`, `cluster.nodes=4`) configure the job; all others go to
the recipe. Exit status: 0 done, 1 submission or run failed, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Optional

from launchers.config import compose_cluster
from launchers.generation_memory import job_phases
from launchers.memory import job_checkpoint, job_memory
from launchers.pipeline import load_pipeline, pipeline_job_root, plan_pipeline, split_overrides
from launchers.plan import JobPlan, plan_job, typed_recipe_config
from launchers.scripts import local_command_line, pipeline_submit_script
from launchers.submit import SBATCH_SCRIPT, SubmitError, render, run_local, submit_job, submit_pipeline
from steerlm.config import ConfigError

log = logging.getLogger("launchers")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launchers",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "args",
        nargs="*",
        metavar="RECIPE [OVERRIDE ...]",
        help="recipe name (recipes/<name>.py) and Hydra overrides; with --pipeline only overrides",
    )
    parser.add_argument("--pipeline", metavar="NAME|PATH", help="a pipeline (launchers/pipelines/NAME.yaml or a path)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the command or script (the default)")
    mode.add_argument("--submit", action="store_true", help="write the job dir and run / sbatch it")
    args = parser.parse_args(argv)
    if not args.pipeline and not args.args:
        parser.error("name a recipe (e.g. demo) or pass --pipeline")
    return args


def log_memory(plan: JobPlan) -> None:
    """The job's memory estimate per GPU (or process) and one checkpoint's size on disk, on stderr: a dry run's
    stdout stays the script alone. Training recipes are sized by `launchers.memory`, the phases that load trained
    checkpoints (generation, scoring) by `launchers.generation_memory`; bootstrap has both."""
    config = typed_recipe_config(plan.config)
    estimate, checkpoint = job_memory(config, plan.world.data), job_checkpoint(config)
    if estimate is not None:
        sys.stderr.write(f"{plan.job_name}: {estimate.describe()}\n")
    if checkpoint is not None:
        sys.stderr.write(f"{plan.job_name}: {checkpoint}\n")
    for phase in job_phases(config, cuda=plan.uses_gpus):
        sys.stderr.write(f"{plan.job_name}: {phase.describe()}\n")


def launch_recipe(recipe: str, overrides: Sequence[str], submit: bool, stamp: str) -> int:
    cluster_overrides, recipe_overrides = split_overrides(overrides)
    plan = plan_job(recipe, recipe_overrides, compose_cluster(cluster_overrides), stamp)
    log_memory(plan)
    if not submit:
        sys.stdout.write(render(plan) if plan.cluster.is_slurm else local_command_line(plan) + "\n")
        return 0
    if not plan.cluster.is_slurm:
        return run_local(plan)
    job_id = submit_job(plan)
    sys.stdout.write(f"submitted job {job_id}: {plan.job_dir / SBATCH_SCRIPT}\n")
    return 0


def launch_pipeline(name: str, overrides: Sequence[str], submit: bool, stamp: str) -> int:
    spec = load_pipeline(name)
    plans = plan_pipeline(spec, overrides, stamp)
    for _, plan in plans:
        log_memory(plan)
    root = pipeline_job_root(plans)
    if not submit:
        parts = [f"# ==== {root / 'submit.sh'}\n" + pipeline_submit_script(spec.name, plans, SBATCH_SCRIPT)]
        parts += [f"# ==== {plan.job_dir / SBATCH_SCRIPT}\n" + render(plan) for _, plan in plans]
        sys.stdout.write("\n".join(parts))
        return 0
    for stage, job_id in submit_pipeline(spec.name, plans, root).items():
        sys.stdout.write(f"{stage}: submitted job {job_id}\n")
    sys.stdout.write(f"pipeline {spec.name}: {root}\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        if args.pipeline:
            return launch_pipeline(args.pipeline, args.args, args.submit, stamp)
        return launch_recipe(args.args[0], args.args[1:], args.submit, stamp)
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    except SubmitError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
