"""Typed cluster configuration: the `cluster` group under conf/cluster/, composed like a recipe's config.

`compose_cluster(["cluster=slurm", "cluster.nodes=4"])` returns a validated `ClusterConfig`. The
group's YAMLs merge into the dataclass in struct mode, so a misspelled key (`cluster.partiton=gpu`)
stops with a ConfigError naming it instead of being ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf

from launchers.hydra_errors import composition_error
from steerlm.config import ConfigError, compose, to_typed

LAUNCH_SCHEMA = "launch_schema"
DEFAULT_CLUSTER = "local"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PASSTHROUGH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")
JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
# Values written into `#SBATCH --name=value` lines: a newline would start a shell line of its own, a space a
# second argument, so each field takes only the characters its Slurm values use.
SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
SLURM_FIELDS = {
    "partition": (re.compile(r"[A-Za-z0-9_.+-]+(?:,[A-Za-z0-9_.+-]+)*"), "partition names (a,b for a list)"),
    "account": (SLURM_NAME, "letters, digits and _.+-"),
    "qos": (SLURM_NAME, "letters, digits and _.+-"),
    "mem": (re.compile(r"\d+[KMGTkmgt]?"), "a size like 0, 64G or 512000M"),
}
# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
TIME_LIMIT = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


class Scheduler(str, Enum):
    local = "local"  # torchrun on this machine
    slurm = "slurm"  # an sbatch script


class Launcher(str, Enum):
    """How a Slurm job starts its processes.

    `torchrun`: one Slurm task per node running torchrun (c10d rendezvous at the first node), which
    starts the node's processes. `srun`: one Slurm task per process; each task maps SLURM_PROCID /
    SLURM_LOCALID / SLURM_NTASKS to RANK / LOCAL_RANK / WORLD_SIZE.
    """

    torchrun = "torchrun"
    srun = "srun"


@dataclass
class ContainerConfig:
    """pyxis/enroot container for the job step (`srun --container-image ...`); Slurm only."""

    image: Optional[str] = None  # e.g. nvcr.io#nvidia/pytorch:25.01-py3 or /shared/images/steerlm.sqsh
    mounts: list[str] = field(default_factory=list)  # "SRC:DST[:FLAGS]" each
    workdir: Optional[str] = None  # the repository inside the container; None: pyxis's default


@dataclass
class ClusterConfig:
    """Where and how a recipe runs: one node with torchrun, or a Slurm job."""

    scheduler: Scheduler = Scheduler.local
    nodes: Optional[int] = None  # None: derived from the parallel layout
    gpus_per_node: int = 0  # 0: a CPU job (processes_per_node is then the knob)
    processes_per_node: Optional[int] = None  # CPU jobs; None: derived (GPU jobs: one per GPU)
    launcher: Launcher = Launcher.torchrun
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # --mem, e.g. "0" for all of a node's memory
    time: Optional[str] = None  # --time in Slurm's formats, e.g. "04:00:00" or "2-00:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    exclusive: bool = False
    job_name: Optional[str] = None  # None: the recipe's name (pipelines: <pipeline>-<stage>)
    job_dir: Optional[str] = None  # None: <workdir>/runs/jobs/<job_name>-<timestamp>
    workdir: Optional[str] = None  # where recipes/ is on the nodes; None: this repository (installed: the cwd)
    python: str = "python"  # the interpreter on the nodes (or in the container)
    setup: list[str] = field(default_factory=list)  # shell lines run before launching
    env: dict[str, str] = field(default_factory=dict)  # written into the script: never secrets
    env_passthrough: list[str] = field(default_factory=list)  # names (NAME or PREFIX*) taken from the job's env
    container: ContainerConfig = field(default_factory=ContainerConfig)
    signal_lead_seconds: Optional[int] = None  # USR1 this long before the time limit; None: no signal
    requeue: bool = False  # after the USR1 checkpoint, requeue the job to resume
    master_port: Optional[int] = None  # None: 20000 + job id % 20000
    sbatch_args: list[str] = field(default_factory=list)  # extra #SBATCH options, e.g. --constraint=h100
    srun_args: list[str] = field(default_factory=list)  # extra srun options

    @property
    def is_slurm(self) -> bool:
        return self.scheduler == Scheduler.slurm

    def validate(self) -> None:
        self._validate_counts()
        self._validate_slurm_fields()
        self._validate_env()
        self._validate_container()

    def _validate_counts(self) -> None:
        _positive_or_none("cluster.nodes", self.nodes)
        _positive_or_none("cluster.processes_per_node", self.processes_per_node)
        _positive_or_none("cluster.cpus_per_task", self.cpus_per_task)
        if self.gpus_per_node < 0:
            raise ConfigError("cluster.gpus_per_node", self.gpus_per_node, "must be >= 0", "use 0 for a CPU job")
        if self.gpus_per_node and self.processes_per_node not in (None, self.gpus_per_node):
            raise ConfigError(
                "cluster.processes_per_node",
                self.processes_per_node,
                f"GPU jobs run one process per GPU (cluster.gpus_per_node={self.gpus_per_node})",
                "set cluster.processes_per_node=null",
            )
        if self.master_port is not None and not 1024 <= self.master_port <= 65535:
            raise ConfigError(
                "cluster.master_port",
                self.master_port,
                "must be in [1024, 65535]",
                "use null to derive it from the job id",
            )
        if not self.python.strip():
            raise ConfigError("cluster.python", self.python, "is empty", "use python or a path to an interpreter")
        if self.job_name is not None and not JOB_NAME.fullmatch(self.job_name):
            raise ConfigError(
                "cluster.job_name",
                self.job_name,
                "may only contain letters, digits and _.+-",
                "pick a name without spaces or quotes",
            )
        for key, path in (("cluster.job_dir", self.job_dir), ("cluster.workdir", self.workdir)):
            if path is not None and (not path or any(c.isspace() or c in "'\"%" for c in path)):
                raise ConfigError(
                    key, path, "must be a non-empty path without spaces, quotes or %", "choose another directory"
                )

    def _validate_slurm_fields(self) -> None:
        if not self.is_slurm:
            for name in ("partition", "account", "qos", "time", "mem"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"cluster.{name}",
                        getattr(self, name),
                        "is a Slurm setting",
                        f"use cluster=slurm, or drop cluster.{name}",
                    )
            if self.nodes not in (None, 1):
                raise ConfigError(
                    "cluster.nodes",
                    self.nodes,
                    "a local run uses this one machine",
                    "use cluster=slurm for several nodes",
                )
            if self.launcher == Launcher.srun:
                raise ConfigError(
                    "cluster.launcher",
                    "srun",
                    "one Slurm task per process needs Slurm",
                    "use cluster.launcher=torchrun or cluster=slurm",
                )
            if self.signal_lead_seconds is not None or self.requeue:
                raise ConfigError(
                    "cluster.signal_lead_seconds",
                    self.signal_lead_seconds,
                    "preemption signals and requeueing are Slurm features",
                    "use cluster=slurm, or signal_lead_seconds=null and requeue=false",
                )
            return
        for name, (pattern, allowed) in SLURM_FIELDS.items():
            value = getattr(self, name)
            if value is not None and not pattern.fullmatch(str(value)):
                raise ConfigError(
                    f"cluster.{name}",
                    value,
                    f"is written into an #SBATCH line and may only be {allowed}",
                    "remove spaces, newlines, quotes and shell characters",
                )
        limit = None if self.time is None else time_limit_seconds(self.time)
        if self.signal_lead_seconds is not None:
            if self.signal_lead_seconds <= 0:
                raise ConfigError(
                    "cluster.signal_lead_seconds",
                    self.signal_lead_seconds,
                    "must be positive",
                    "use e.g. 300, or null for no preemption signal",
                )
            if limit is not None and self.signal_lead_seconds >= limit:
                raise ConfigError(
                    "cluster.signal_lead_seconds",
                    self.signal_lead_seconds,
                    f"must be shorter than the time limit cluster.time={self.time} ({limit} s)",
                    "lower it or raise cluster.time",
                )
        if self.requeue and self.signal_lead_seconds is None:
            raise ConfigError(
                "cluster.requeue",
                True,
                "the job requeues itself after the USR1 checkpoint, but no signal is requested",
                "set cluster.signal_lead_seconds (e.g. 300) or cluster.requeue=false",
            )
        # An #SBATCH line ends at a newline and splits at whitespace; srun's options are shell-quoted.
        for key, args, spaces in (
            ("cluster.sbatch_args", self.sbatch_args, False),
            ("cluster.srun_args", self.srun_args, True),
        ):
            for arg in args:
                if not arg.startswith("-") or any(not c.isprintable() or (c.isspace() and not spaces) for c in arg):
                    raise ConfigError(
                        key,
                        arg,
                        "each entry is one option starting with '-'"
                        + ("" if spaces else ", without spaces")
                        + " or control characters",
                        "write it like --constraint=h100",
                    )

    def _validate_env(self) -> None:
        for name in self.env:
            if not ENV_NAME.fullmatch(name):
                raise ConfigError(
                    f"cluster.env.{name}", self.env[name], "is not a shell variable name", "use letters, digits and _"
                )
            if SECRET_NAME.search(name):
                raise ConfigError(
                    f"cluster.env.{name}",
                    "<hidden>",
                    "looks like a secret, and cluster.env values are written into the job script",
                    f"remove it from cluster.env, export it before submitting and add {name} "
                    "to cluster.env_passthrough",
                )
        for name in self.env_passthrough:
            if not PASSTHROUGH_NAME.fullmatch(name):
                raise ConfigError(
                    "cluster.env_passthrough",
                    name,
                    "is not a variable name or NAME_PREFIX*",
                    "write e.g. NCCL_* or HF_TOKEN",
                )

    def _validate_container(self) -> None:
        container = self.container
        if container.image is None:
            if container.mounts or container.workdir:
                raise ConfigError(
                    "cluster.container.image",
                    None,
                    "mounts/workdir are set but no image",
                    "set cluster.container.image or drop the container settings",
                )
            return
        if not self.is_slurm:
            raise ConfigError(
                "cluster.container.image",
                container.image,
                "containers run through Slurm's pyxis",
                "use cluster=slurm, or cluster.container.image=null",
            )
        if not container.image.strip() or any(c.isspace() for c in container.image):
            raise ConfigError(
                "cluster.container.image",
                container.image,
                "must be an image name or path",
                "e.g. nvcr.io#nvidia/pytorch:25.01-py3",
            )
        for mount in container.mounts:
            parts = mount.split(":")
            if not 2 <= len(parts) <= 3 or not all(parts[:2]) or any(c.isspace() or c == "," for c in mount):
                raise ConfigError(
                    "cluster.container.mounts",
                    mount,
                    "each mount is SRC:DST[:FLAGS]",
                    "write e.g. /lustre/data:/data or /lustre/data:/data:ro",
                )


def _positive_or_none(key: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ConfigError(key, value, "must be >= 1", "use a positive number or null")


def time_limit_seconds(limit: str) -> int:
    """Slurm's --time value in seconds (`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`)."""
    match = TIME_LIMIT.fullmatch(limit)
    if not match:
        raise ConfigError("cluster.time", limit, "is not a Slurm time limit", "use minutes, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = match.groups()
    numbers = [int(part) for part in (first, second, third) if part is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = (numbers + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(numbers) == 1:
        return numbers[0] * 60
    if len(numbers) == 2:
        return numbers[0] * 60 + numbers[1]
    return (numbers[0] * 60 + numbers[1]) * 60 + numbers[2]


@dataclass
class LaunchConfig:
    """Root of the launcher's own config: the `cluster` group (default: local)."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"cluster": DEFAULT_CLUSTER}])
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register_launch_schema() -> None:
    """Put the launcher's root schema into Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name=LAUNCH_SCHEMA, node=LaunchConfig)


def compose_cluster(overrides: Sequence[str] = ()) -> ClusterConfig:
    """Compose conf/cluster/<option>.yaml with `cluster...` overrides into a validated ClusterConfig."""
    register_launch_schema()
    try:
        composed = compose(LAUNCH_SCHEMA, list(overrides))
    except HydraException as error:
        raise composition_error(error, overrides, ClusterConfig, "cluster") from None
    cluster = to_typed(composed, LaunchConfig).cluster
    cluster.validate()
    return cluster


def cluster_yaml(cluster: ClusterConfig) -> str:
    """The resolved cluster config as YAML (saved next to every generated job script)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cluster))
