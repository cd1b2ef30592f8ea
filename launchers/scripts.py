"""Pure renderers: JobPlan → torchrun command, local run script, sbatch script, pipeline submit script.

The text is what a cluster user would write by hand; nothing here touches the file system or runs
anything, so every line is covered by golden tests.

Preemption (`cluster.signal_lead_seconds`): Slurm sends USR1 to the batch shell only
(`--signal=B:USR1@<s>`). The shell's trap forwards it to srun, which passes it to every process of
the job step. The launching processes (torchrun's agent, the per-task bash) ignore USR1 — torchrun's
agent would otherwise die of it and take the workers with it — and the training processes
checkpoint after the current step and exit 0. The shell then runs `scontrol requeue` (Slurm holds a
requeued job ~2 minutes before it is eligible again) and the rerun resumes from
`<output_dir>/checkpoints/latest`. Without `cluster.requeue` the job exits 75 after the checkpoint,
so `afterok` dependents do not start on an unfinished stage.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from launchers.config import Launcher
from launchers.plan import JobPlan

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped early on USR1 and not requeued
INDENT = "    "


def q(word: str | Path) -> str:
    return shlex.quote(str(word))


def recipe_words(plan: JobPlan) -> list[str]:
    return [plan.cluster.python, plan.recipe_path, *plan.overrides]


def torchrun_command(plan: JobPlan) -> list[str]:
    """argv of a one-node torchrun launch of the recipe (run from plan.workdir)."""
    return [
        plan.cluster.python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={plan.world.processes_per_node}",
        plan.recipe_path,
        *plan.overrides,
    ]


def local_command_line(plan: JobPlan) -> str:
    """The torchrun command as one shell line, with its environment and directory."""
    env = " ".join(f"{name}={q(value)}" for name, value in plan.cluster.env.items())
    command = " ".join(q(word) for word in torchrun_command(plan))
    return f"cd {q(plan.workdir)} && " + (f"{env} " if env else "") + command


def _header(plan: JobPlan) -> list[str]:
    world = plan.world
    unit = "GPUs" if plan.uses_gpus else "processes"
    nodes = f"{world.nodes} node" + ("s" if world.nodes > 1 else "")
    lines = [
        f"# steerlm job {plan.job_name}: {plan.recipe_path}, {nodes} x {world.processes_per_node} {unit}",
        f"# ({world.describe()}).",
    ]
    if plan.note:
        lines.append(f"# {plan.note}")
    lines.append(
        f"# Written by `python -m launchers`; resolved configs in {plan.job_dir}/ (config.yaml, cluster.yaml)."
    )
    return lines


def _exports(plan: JobPlan) -> list[str]:
    cluster = plan.cluster
    lines = [f"export {name}={q(value)}" for name, value in cluster.env.items()]
    if cluster.cpus_per_task and "OMP_NUM_THREADS" not in cluster.env and cluster.is_slurm:
        per_task = plan.world.processes_per_node if cluster.launcher == Launcher.torchrun else 1
        lines.append(f"export OMP_NUM_THREADS={max(1, cluster.cpus_per_task // per_task)}")
    return lines


def local_script(plan: JobPlan) -> str:
    """run.sh for `cluster=local`: the torchrun command with its directory, setup and environment."""
    lines = [
        "#!/bin/bash",
        *_header(plan),
        "set -euo pipefail",
        "",
        f"cd {q(plan.workdir)}",
        *plan.cluster.setup,
        *_exports(plan),
        "exec " + " ".join(q(word) for word in torchrun_command(plan)),
    ]
    return "\n".join(lines) + "\n"


def _directives(plan: JobPlan) -> list[str]:
    cluster, world = plan.cluster, plan.world
    tasks_per_node = 1 if cluster.launcher == Launcher.torchrun else world.processes_per_node
    options = [f"--job-name={plan.job_name}", f"--nodes={world.nodes}", f"--ntasks-per-node={tasks_per_node}"]
    if cluster.gpus_per_node:
        options.append(f"--gpus-per-node={cluster.gpus_per_node}")
    for name in ("cpus_per_task", "mem", "time", "partition", "account", "qos"):
        value = getattr(cluster, name)
        if value is not None:
            options.append(f"--{name.replace('_', '-')}={value}")
    if cluster.exclusive:
        options.append("--exclusive")
    options += [
        f"--chdir={plan.workdir}",
        f"--output={plan.job_dir}/slurm-%j.out",
        f"--error={plan.job_dir}/slurm-%j.err",
        "--open-mode=append",
    ]
    if cluster.signal_lead_seconds is not None:
        options.append(f"--signal=B:USR1@{cluster.signal_lead_seconds}")
    if cluster.requeue:
        options.append("--requeue")
    options += cluster.sbatch_args
    return [f"#SBATCH {option}" for option in options]


def _trap(plan: JobPlan) -> list[str]:
    if plan.cluster.signal_lead_seconds is None:
        return []
    after = (
        "then the job requeues itself and the rerun resumes from the latest checkpoint"
        if plan.cluster.requeue
        else f"then the job exits {PREEMPTED_EXIT}; resubmit it to resume from the latest checkpoint"
    )
    return [
        f"# Slurm sends USR1 to this shell {plan.cluster.signal_lead_seconds} s before the time limit. "
        "srun passes it to the",
        "# training processes (the launching processes ignore it), which checkpoint after the current step",
        f"# and exit 0; {after}.",
        "preempted=0",
        'srun_pid=""',
        "# shellcheck disable=SC2317  # invoked by the trap",
        "forward_usr1() {",
        f"{INDENT}preempted=1",
        f'{INDENT}echo "USR1 received: the training checkpoints and stops"',
        f'{INDENT}if [[ -n $srun_pid ]]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi',
        "}",
        "trap forward_usr1 USR1",
        "",
    ]


def _passthrough(plan: JobPlan) -> list[str]:
    names = plan.cluster.env_passthrough
    if not names:
        return []
    pattern = "|".join(name[:-1] + ".*" if name.endswith("*") else name for name in names)
    return [
        f"# Passed through from the submission environment by name; values are never written here: {' '.join(names)}",
        f"passthrough=$(compgen -e | grep -E '^({pattern})$' | paste -sd, -)",
        'echo "environment passed through: ${passthrough:-none}"',
    ]


def _rendezvous(plan: JobPlan) -> list[str]:
    port = plan.cluster.master_port
    return [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={port}" if port else "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export MASTER_ADDR MASTER_PORT",
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, '
        'rendezvous at $MASTER_ADDR:$MASTER_PORT"',
    ]


def _srun_options(plan: JobPlan) -> list[str]:
    """srun's options, one continuation line per group: tasks, container, the user's extra options."""
    cluster = plan.cluster
    tasks_per_node = 1 if cluster.launcher == Launcher.torchrun else plan.world.processes_per_node
    tasks = ["--kill-on-bad-exit=1", f"--ntasks-per-node={tasks_per_node}"]
    if cluster.cpus_per_task:
        tasks.append(f"--cpus-per-task={cluster.cpus_per_task}")
    groups = [" ".join(tasks)]
    container = cluster.container
    if container.image:
        flags = [f"--container-image={q(container.image)}"]
        if container.mounts:
            flags.append(f"--container-mounts={q(','.join(container.mounts))}")
        if container.workdir:
            flags.append(f"--container-workdir={q(container.workdir)}")
        if cluster.env_passthrough:
            flags.append('${passthrough:+"--container-env=$passthrough"}')
        groups.append(" ".join(flags))
    if cluster.srun_args:
        groups.append(" ".join(q(arg) for arg in cluster.srun_args))
    return groups


def _task_wrapper(plan: JobPlan) -> list[str]:
    """`bash -c '...' NAME` before the command: ignore USR1 in launchers, set ranks per srun task."""
    steps = []
    if plan.cluster.signal_lead_seconds is not None:
        steps.append('trap "" USR1')
    if plan.cluster.launcher == Launcher.srun:
        steps.append(
            "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
            "LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE"
        )
    if not steps:
        return []
    name = "torchrun" if plan.cluster.launcher == Launcher.torchrun else "rank"
    return ["bash -c '" + "; ".join(steps + ['exec "$@"']) + f"' {name}"]


def _launch_words(plan: JobPlan) -> list[str]:
    if plan.cluster.launcher == Launcher.srun:
        return [" ".join(q(word) for word in recipe_words(plan))]
    torchrun = [
        q(plan.cluster.python),
        "-m torch.distributed.run",
        f"--nnodes={plan.world.nodes}",
        f"--nproc-per-node={plan.world.processes_per_node}",
    ]
    rendezvous = [
        '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"',
        "--max-restarts=0",
    ]
    recipe = " ".join(q(word) for word in [plan.recipe_path, *plan.overrides])
    return [" ".join(torchrun), " ".join(rendezvous), recipe]


def _launch(plan: JobPlan) -> list[str]:
    options = _srun_options(plan)
    parts = ["srun " + options[0], *options[1:], *_task_wrapper(plan), *_launch_words(plan)]
    lines = []
    if plan.cluster.launcher == Launcher.srun:
        lines.append("# shellcheck disable=SC2016  # $SLURM_* expand in each task, not here")
    body = [(INDENT if i else "") + part + " \\" for i, part in enumerate(parts[:-1])] + [INDENT + parts[-1]]
    if plan.cluster.signal_lead_seconds is None:
        return lines + body
    body[-1] += " &"
    return (
        lines
        + body
        + [
            "srun_pid=$!",
            "# A trapped signal interrupts `wait`: wait again until srun has exited.",
            "while :; do",
            f"{INDENT}status=0",
            f'{INDENT}wait "$srun_pid" || status=$?',
            f'{INDENT}kill -0 "$srun_pid" 2>/dev/null || break',
            "done",
            *_after_signal(plan),
            'exit "$status"',
        ]
    )


def _after_signal(plan: JobPlan) -> list[str]:
    if plan.cluster.requeue:
        action = [
            f'{INDENT}echo "requeueing job $SLURM_JOB_ID (srun exited with $status); the rerun resumes"',
            f'{INDENT}scontrol requeue "$SLURM_JOB_ID" && exit 0',
            f'{INDENT}echo "scontrol requeue failed; resubmit this script to resume" >&2',
            f"{INDENT}exit 1",
        ]
    else:
        action = [
            f'{INDENT}echo "stopped early by USR1 (srun exited with $status); resubmit to resume" >&2',
            f"{INDENT}exit {PREEMPTED_EXIT}",
        ]
    return ["if (( preempted )); then", *action, "fi"]


def sbatch_script(plan: JobPlan) -> str:
    """The job script for `sbatch`."""
    cluster = plan.cluster
    lines = ["#!/bin/bash", *_header(plan), *_directives(plan), "", "set -uo pipefail", "", *_trap(plan)]
    if cluster.setup:
        lines += [*cluster.setup, ""]
    lines += [*_exports(plan), *_passthrough(plan), *_rendezvous(plan), "", *_launch(plan)]
    return "\n".join(lines) + "\n"


def pipeline_submit_script(pipeline: str, stages: Sequence[tuple[str, JobPlan]], script_name: str) -> str:
    """submit.sh: sbatch each stage's script, each after the previous one succeeded (afterok)."""
    lines = [
        "#!/bin/bash",
        f"# steerlm pipeline {pipeline}: {len(stages)} stage(s); each starts only after the previous one "
        "succeeded (afterok).",
        "# Written by `python -m launchers --pipeline`; each stage's script and configs are in its folder.",
        "set -euo pipefail",
        "",
    ]
    previous = None
    for name, plan in stages:
        var = f"job_{name}"
        dependency = f'--dependency=afterok:"${previous}" --kill-on-invalid-dep=yes ' if previous else ""
        lines += [
            f"{var}=$(sbatch --parsable {dependency}{q(plan.job_dir / script_name)})",
            f"{var}=${{{var}%%;*}}",
            f'echo "{name}: job ${var}"',
        ]
        previous = var
    return "\n".join(lines) + "\n"
