"""Pipelines: one Slurm job per stage, chained with `--dependency=afterok`.

A pipeline is a YAML file (`launchers/pipelines/<name>.yaml`, or any path):

    name: demo
    run_dir: runs/pipeline_demo          # referenced by stages as ${run_dir}
    stages:
      - name: pretrain
        recipe: demo
        overrides: [parallel=tp2, "output_dir=${run_dir}/lm"]
        cluster: [cluster.launcher=srun]  # this stage's cluster overrides

Command-line overrides apply to every stage, before the stage's own (the stage's win).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launchers.config import compose_cluster
from launchers.plan import REPO_ROOT, JobPlan, job_paths, plan_job
from steerlm.config import ConfigError

PIPELINES_DIR = Path(__file__).resolve().parent / "pipelines"
STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class StageSpec:
    name: str = MISSING
    recipe: str = MISSING
    overrides: list[str] = field(default_factory=list)
    cluster: list[str] = field(default_factory=list)


@dataclass
class PipelineSpec:
    name: str = MISSING
    run_dir: str = "runs/pipeline"
    stages: list[StageSpec] = field(default_factory=list)

    def validate(self) -> None:
        if not STAGE_NAME.fullmatch(self.name.replace("-", "_")):
            raise ConfigError(
                "pipeline.name", self.name, "must be lower-case letters, digits, _ or -", "rename the pipeline"
            )
        if not self.stages:
            raise ConfigError("pipeline.stages", [], "is empty", "list at least one stage")
        seen: set[str] = set()
        for index, stage in enumerate(self.stages):
            if not STAGE_NAME.fullmatch(stage.name) or stage.name in seen:
                raise ConfigError(
                    f"pipeline.stages.{index}.name",
                    stage.name,
                    "must be unique and lower-case letters, digits or _",
                    "rename the stage",
                )
            seen.add(stage.name)
            for override in stage.cluster:
                if not override.lstrip("+~").startswith("cluster"):
                    raise ConfigError(
                        f"pipeline.stages.{index}.cluster",
                        override,
                        "is not a cluster override",
                        "move recipe overrides to the stage's overrides list",
                    )


def pipeline_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError("pipeline", name_or_path, "no such file", "pass a pipeline YAML or a shipped name")
        return path
    shipped = PIPELINES_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml")))
        raise ConfigError("pipeline", name_or_path, "is not a shipped pipeline", f"use one of: {names}, or a path")
    return shipped


def load_pipeline(name_or_path: str) -> PipelineSpec:
    """Read, type-check (unknown keys are errors), resolve ${...} and validate a pipeline."""
    path = pipeline_path(name_or_path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineSpec), OmegaConf.load(path))
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "pipeline"
        raise ConfigError(
            f"pipeline.{key}", getattr(error, "value", None), str(error).splitlines()[0], f"fix {path}"
        ) from None
    assert isinstance(spec, PipelineSpec)
    spec.validate()
    return spec


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(cluster overrides, recipe overrides): `cluster=...`, `cluster.x=...` (and +/~ forms) go to the cluster."""
    cluster: list[str] = []
    recipe: list[str] = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        (cluster if key == "cluster" or key.startswith("cluster.") else recipe).append(override)
    return cluster, recipe


def plan_pipeline(spec: PipelineSpec, overrides: Sequence[str], stamp: str) -> list[tuple[str, JobPlan]]:
    """One JobPlan per stage, job dirs <job root>/<stage>; every stage is validated before any is written."""
    cluster_overrides, recipe_overrides = split_overrides(overrides)
    root_cluster = compose_cluster(cluster_overrides)
    if not root_cluster.is_slurm:
        raise ConfigError(
            "cluster.scheduler",
            root_cluster.scheduler.value,
            "a pipeline chains Slurm jobs with --dependency=afterok",
            "use cluster=slurm (or run the stages one by one with cluster=local)",
        )
    _, job_root = job_paths(root_cluster, spec.name, stamp)
    plans = []
    for index, stage in enumerate(spec.stages, start=1):
        cluster = compose_cluster([*cluster_overrides, *stage.cluster])
        previous = f"; runs after {spec.stages[index - 2].name} succeeds" if index > 1 else ""
        note = f"Stage {index}/{len(spec.stages)} ({stage.name}) of pipeline {spec.name}{previous}."
        plans.append(
            (
                stage.name,
                plan_job(
                    stage.recipe,
                    [*recipe_overrides, *stage.overrides],
                    cluster,
                    stamp,
                    job_name=f"{cluster.job_name or spec.name}-{stage.name}",
                    job_dir=job_root / stage.name,
                    note=note,
                ),
            )
        )
    return plans


def pipeline_job_root(plans: Sequence[tuple[str, JobPlan]]) -> Path:
    return plans[0][1].job_dir.parent if plans else REPO_ROOT
