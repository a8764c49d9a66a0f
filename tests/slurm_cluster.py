"""A real one-node SLURM cluster on localhost for tests: munged, slurmctld and slurmd started by hand, stopped by PID.

Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them) and root (slurmd runs jobs as the submitter).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing_reason() -> str | None:
    """Why a local cluster cannot start here, or None."""
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []

    def start(self) -> LocalCluster:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        cpus = os.cpu_count() or 1
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=pardtest",
                    f"SlurmctldHost={self.host}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    # A requeued job may start once its old credential expired (default 120 s): keep tests short.
                    "AuthInfo=cred_expire=10",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "JobRequeue=1",
                    "MinJobAge=600",
                    "KillWait=10",
                    "SchedulerType=sched/backfill",
                    # ... and then only the main scheduler's periodic pass starts it (every 60 s by default): every 2 s.
                    "SchedulerParameters=sched_interval=2",
                    f"StateSaveLocation={self.root / 'state'}",
                    f"SlurmdSpoolDir={self.root / 'spool'}",
                    f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.root / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        subprocess.run([_binary("slurmctld"), "-i"], env=self.env, check=True)  # -i: ignore stale state
        self.pid_files.append(self.root / "slurmctld.pid")
        subprocess.run([_binary("slurmd")], env=self.env, check=True)
        self.pid_files.append(self.root / "slurmd.pid")
        self._wait_idle()
        return self

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return  # a munged already serves this machine; not ours to stop
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _binary("munged")], check=True)
        self.pid_files.append(run / "munged.pid")

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True).stdout
            if "idle" in out:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node did not become idle: {out!r}; see {self.root / 'log'}")

    def stop(self) -> None:
        for pid_file in reversed(self.pid_files):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        time.sleep(0.5)

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as key=value pairs."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)

    def wait(self, job_id: str, until: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {until} after {timeout} s: {self.job(job_id)}")
