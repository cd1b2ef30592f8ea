"""A real single-node Slurm (Debian's slurmctld + slurmd + munge) for the launcher tests.

Started as root in a private directory: munged on its own socket, slurmctld and slurmd on free ports,
so a system Slurm or a second test session on the same machine is left alone. Each daemon runs in
the foreground in its own session; `stop()` ends exactly those PIDs. Jobs are followed by polling
`scontrol show job` once a second (`sbatch --wait` polls at 2, 8, 32 s and misreports dependency
cancellations as success).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SHELLCHECK = "shellcheck"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
MUNGE_USER = "munge"


def _which_all(names: tuple[str, ...]) -> list[str]:
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [name for name in names if shutil.which(name, path=search) is None]


def install_packages(packages: tuple[str, ...]) -> str | None:
    """apt-get install the packages when root (not with STEERLM_NO_APT=1); returns why not, or None."""
    if os.environ.get("STEERLM_NO_APT") == "1":
        return "STEERLM_NO_APT=1"
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("apt-get") is None:
        return "no apt-get to install " + " ".join(packages)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages])
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode:
            return f"`{' '.join(command)}` failed: {done.stderr.strip()[-300:]}"
    return None


def shellcheck_path() -> str | None:
    """shellcheck, installed with apt-get when missing and possible; None when unavailable."""
    if shutil.which(SHELLCHECK) is None:
        install_packages((SHELLCHECK,))
    return shutil.which(SHELLCHECK)


def slurm_unavailable_reason() -> str | None:
    """Why a private Slurm cannot be started here (None: it can)."""
    if os.geteuid() != 0:
        return "a private Slurm needs root (slurmd runs jobs as their user)"
    if _which_all(DAEMONS):
        reason = install_packages(PACKAGES)
        if reason:
            return f"Slurm packages missing and not installable: {reason}"
        if _which_all(DAEMONS):
            return f"Slurm commands still missing after install: {_which_all(DAEMONS)}"
    if not Path("/etc/munge/munge.key").is_file():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_hardware() -> str:
    """`slurmd -C`'s CPU fields for NodeName=localhost, RealMemory a bit under what it reports."""
    line = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in line.split())
    memory = int(int(fields["RealMemory"]) * 0.9)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return " ".join(f"{key}={fields[key]}" for key in keep if key in fields) + f" RealMemory={memory}"


def _slurm_conf(root: Path, munge_socket: Path) -> str:
    return "\n".join(
        [
            "ClusterName=steerlmtest",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CryptoType=crypto/munge",
            f"AuthInfo=socket={munge_socket}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MailProg=/bin/true",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=300",
            "DependencyParameters=kill_invalid_depend",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            f"NodeName=localhost NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


@dataclass
class SingleNodeSlurm:
    """The daemons of one private cluster; `env` points Slurm's client commands at it."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    _processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, ready_timeout: float = 30.0) -> SingleNodeSlurm:
        munge_dir = self.root / "munge"
        for path in (self.root / "state", self.root / "spool", munge_dir):
            path.mkdir(parents=True, exist_ok=True)
        shutil.chown(munge_dir, MUNGE_USER, MUNGE_USER)
        munge_socket = munge_dir / "munge.socket"
        conf = self.root / "slurm.conf"
        conf.write_text(_slurm_conf(self.root, munge_socket))
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        self._spawn(
            "munged",
            [
                "setpriv",
                f"--reuid={MUNGE_USER}",
                f"--regid={MUNGE_USER}",
                "--init-groups",
                "munged",
                "--foreground",
                f"--socket={munge_socket}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        self._wait_for(lambda: munge_socket.exists(), ready_timeout, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(conf)])
        self._wait_for(self._node_idle, ready_timeout, "node localhost idle in sinfo")
        return self

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        process = subprocess.Popen(
            [shutil.which(command[0], path="/usr/sbin:/usr/bin:/sbin:/bin") or command[0], *command[1:]],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._processes.append(process)
        self.pids[name] = process.pid

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{process.args[0]} exited with {process.returncode} while waiting for "
                        f"{what}; logs in {self.root}"
                    )
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s; logs in {self.root}")

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return done.returncode == 0 and done.stdout.strip() == "idle"

    def stop(self) -> None:
        """SIGTERM each daemon by its PID (slurmd, slurmctld, then munged), SIGKILL after 10 s."""
        for process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self._processes.clear()

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        """Poll once a second until the job is in one of `states` (or any final state)."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states | FINAL_STATES:
                return info
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}")

    def logs(self) -> str:
        """The daemons' log tails, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)
