"""From a recipe, its overrides and a cluster config to a `JobPlan`: nodes, processes, paths.

World size comes from the config: `nodes x processes per node` must equal `tp x pp x cp x dp`.
When `cluster.nodes` is null it is derived (with dp given: exactly enough nodes; with dp derived:
the fewest whole nodes holding one model replica). Everything is checked before a script is written.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from launchers.config import ClusterConfig
from launchers.hydra_errors import composition_error
from steerlm.config import Accelerator, ConfigError, ParallelConfig, TrainConfig, compose, to_typed
from steerlm.config.store import RECIPES_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
# A checkout has recipes/ (a link to steerlm/recipes/) next to launchers/; `pip install .` installs the package only.
IN_CHECKOUT = (REPO_ROOT / "recipes").is_dir()


@dataclass(frozen=True)
class WorldPlan:
    """How many processes a job runs and how they split into nodes and data-parallel replicas."""

    nodes: int
    processes_per_node: int
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    def describe(self) -> str:
        return (
            f"world size {self.world_size}: tp {self.tensor} x pp {self.pipeline} x cp {self.context} x dp {self.data}"
        )


@dataclass(frozen=True)
class JobPlan:
    """Everything a torchrun command or an sbatch script is rendered from."""

    recipe: str
    overrides: tuple[str, ...]
    config: DictConfig  # the recipe's resolved config (saved as config.yaml in the job dir)
    cluster: ClusterConfig
    world: WorldPlan
    job_name: str
    job_dir: Path  # absolute, on the shared file system
    workdir: Path  # absolute: where the job runs on the nodes (a checkout: where recipes/ lives)
    note: str = ""  # one line for the script's header (e.g. the pipeline stage)

    @property
    def recipe_path(self) -> str:
        """recipes/<name>.py under workdir (a checkout); from an installed steerlm without one, the installed file."""
        if self.cluster.workdir or IN_CHECKOUT:
            return f"recipes/{self.recipe}.py"
        return str(RECIPES_DIR / f"{self.recipe}.py")

    @property
    def uses_gpus(self) -> bool:
        return self.cluster.gpus_per_node > 0


def available_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.py") if not path.stem.startswith("_"))


def recipe_config_name(recipe: str) -> str:
    """The recipe's Hydra primary config (`@hydra.main(config_name=...)`), or a ConfigError."""
    path = RECIPES_DIR / f"{recipe}.py"
    if not path.is_file():
        raise ConfigError(
            "recipe", recipe, f"there is no recipes/{recipe}.py", f"use one of: {', '.join(available_recipes())}"
        )
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and any(kw.arg == "config_name" for kw in node.keywords):
            value = next(kw.value for kw in node.keywords if kw.arg == "config_name")
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    raise ConfigError(
        "recipe", recipe, f"recipes/{recipe}.py has no @hydra.main(config_name=...)", "launch a Hydra recipe"
    )


def compose_recipe(recipe: str, overrides: Sequence[str]) -> DictConfig:
    """Compose the recipe's config exactly as the recipe would, without running it."""
    config_name = recipe_config_name(recipe)
    try:
        return compose(config_name, list(overrides))
    except HydraException as error:
        raise composition_error(
            error, overrides, None, recipe, f"list the recipe's keys with `python recipes/{recipe}.py --cfg job`"
        ) from None


def typed_recipe_config(config: DictConfig) -> object:
    """The recipe's schema dataclass (TrainConfig, ...), type-checked; a plain dict when it has none."""
    schema = OmegaConf.get_type(config)
    if schema is None or schema is dict:
        return OmegaConf.to_container(config, resolve=True)
    return to_typed(config, schema)


def plan_world(parallel: Optional[ParallelConfig], cluster: ClusterConfig) -> WorldPlan:
    """Nodes and processes per node for this layout on this cluster, or a ConfigError."""
    per_node = cluster.gpus_per_node or cluster.processes_per_node
    per_node_key = "cluster.gpus_per_node" if cluster.gpus_per_node else "cluster.processes_per_node"
    if parallel is None:  # not a training recipe: one process
        if (cluster.nodes or 1) != 1 or (per_node or 1) != 1:
            raise ConfigError(
                per_node_key if (per_node or 1) != 1 else "cluster.nodes",
                per_node or cluster.nodes,
                "this recipe has no parallel layout and runs as one process",
                "use cluster.nodes=1 and one process (cluster.gpus_per_node<=1)",
            )
        return WorldPlan(nodes=1, processes_per_node=1)
    mp = parallel.model_parallel_size
    dp = parallel.data_parallel_size
    sizes = (
        f"tp x pp x cp = {parallel.tensor_model_parallel_size} x {parallel.pipeline_model_parallel_size} x "
        f"{parallel.context_parallel_size} = {mp}"
    )
    if per_node is None:  # CPU job without a per-node count: fill the given nodes
        nodes = cluster.nodes or 1
        needed = mp * (dp or 1)
        if needed % nodes:
            raise ConfigError(
                "cluster.nodes",
                nodes,
                f"the layout needs {needed} processes ({sizes}, dp {dp or 1}), "
                f"which do not split evenly over {nodes} nodes",
                "set cluster.processes_per_node, or a node count that divides the process count",
            )
        per_node = needed // nodes
    elif cluster.nodes is None:
        if dp is None:
            nodes = mp // math.gcd(mp, per_node)
        elif (mp * dp) % per_node:
            raise ConfigError(
                per_node_key,
                per_node,
                f"the layout needs {mp * dp} processes ({sizes}, dp {dp}), which do not fill whole nodes of {per_node}",
                f"use a data_parallel_size that makes {mp} x dp a multiple of {per_node}, or set cluster.nodes",
            )
        else:
            nodes = mp * dp // per_node
    else:
        nodes = cluster.nodes
    world = nodes * per_node
    if dp is not None and world != mp * dp:
        raise ConfigError(
            "cluster.nodes",
            nodes,
            f"{nodes} nodes x {per_node} processes = {world} processes, but {sizes} and dp {dp} need {mp * dp}",
            "set cluster.nodes=null to derive it, or parallel.data_parallel_size=null",
        )
    if world % mp:
        raise ConfigError(
            "cluster.nodes",
            nodes,
            f"{nodes} nodes x {per_node} processes = {world} processes is not a multiple of {sizes}",
            "set cluster.nodes=null to derive it, or change the parallel sizes",
        )
    return WorldPlan(
        nodes=nodes,
        processes_per_node=per_node,
        tensor=parallel.tensor_model_parallel_size,
        pipeline=parallel.pipeline_model_parallel_size,
        context=parallel.context_parallel_size,
        data=world // mp,
    )


def job_paths(cluster: ClusterConfig, job_name: str, stamp: str) -> tuple[Path, Path]:
    """(workdir, job_dir), absolute: cluster.workdir (default: this repository; installed: the current directory)
    and cluster.job_dir (relative to workdir; default runs/jobs/<job_name>-<stamp>)."""
    workdir = Path(cluster.workdir) if cluster.workdir else REPO_ROOT if IN_CHECKOUT else Path.cwd()
    job_dir = workdir / (cluster.job_dir or f"runs/jobs/{job_name}-{stamp}")
    return workdir, job_dir


def plan_job(
    recipe: str,
    overrides: Sequence[str],
    cluster: ClusterConfig,
    stamp: str,
    job_name: Optional[str] = None,
    job_dir: Optional[Path] = None,
    note: str = "",
) -> JobPlan:
    """Compose and validate the recipe's config for this cluster; nothing is written.

    `stamp` names the default job directory (the CLI passes the submission time).
    """
    config = compose_recipe(recipe, overrides)
    typed = typed_recipe_config(config)
    world = plan_world(getattr(typed, "parallel", None), cluster)
    if isinstance(typed, TrainConfig):
        accelerator = Accelerator.cuda if cluster.gpus_per_node else Accelerator.cpu
        typed.validate(world.world_size, accelerator, this_machine=False)
    elif hasattr(typed, "validate"):
        typed.validate()
    name = job_name or cluster.job_name or recipe
    workdir, default_dir = job_paths(cluster, name, stamp)
    return JobPlan(
        recipe=recipe,
        overrides=tuple(overrides),
        config=config,
        cluster=cluster,
        world=world,
        job_name=name,
        job_dir=job_dir or default_dir,
        workdir=workdir,
        note=note,
    )
