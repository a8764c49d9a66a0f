"""scripts/slurm/train.sbatch on a real one-node SLURM cluster started on localhost: the tiny preset on 2 CPU
processes, stopped like a preemption (USR1 to the batch script, as
``--signal=B:USR1@120`` sends before the time limit) checkpoints, requeues itself and resumes to COMPLETED.

Skipped when slurm-wlm/munge are not installed (``.ci/run`` installs them with apt-get) or not running as root.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from launch import REPO, records
from slurm_cluster import LocalCluster, missing_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(cluster, tmp_path, tiny_checkpoint, *overrides):
    env = {
        "PYTHON": sys.executable,
        "NPROC_PER_NODE": "2",
        "PARD_RUN_DIR": str(tmp_path / "run"),
        "OMP_NUM_THREADS": "1",
    }
    return cluster.sbatch(
        "--nodes=1",
        # train.sbatch asks for 32 CPUs and 256 GB per node by default; this node has 2 CPUs and no memory accounting.
        "--cpus-per-task=2",
        "--mem=0",
        "--job-name=pardtest",
        f"--output={tmp_path}/job-%j.out",
        "scripts/slurm/train.sbatch",
        "+config=tiny",
        f"model.path={tiny_checkpoint}",
        f"run.output_root={tmp_path}",
        "data.max_samples=96",
        "data.max_length=128",
        "train.micro_batch_size=2",
        "train.log_every=1",
        *overrides,
        cwd=REPO,
        env=env,
    )


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path, tiny_checkpoint):
    """One job does both: two processes on the CPUs the sbatch line asked for, stopped like a preemption, then
    requeued, resumed and completed with its final model."""
    job = submit(cluster, tmp_path, tiny_checkpoint, "train.max_steps=16", "checkpoint.every_steps=2")
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob("step_*/COMPLETE")):
        assert time.monotonic() < deadline and cluster.job(job).get("JobState") in {"PENDING", "RUNNING"}
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    info = cluster.wait(job, {"PENDING"} | ENDED, timeout=120)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", (info, job_output(tmp_path, job)[-3000:])
    info = cluster.wait(job, ENDED, timeout=300)
    output = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, output[-3000:])
    assert info["Restarts"] == "1" and info["NumCPUs"] == "2", info  # the sbatch line's request replaced the default
    assert "requeueing job" in output and "resuming from" in output, output[-3000:]
    assert "replicas agree: 2 processes" in output
    stopped_at = int(output.split("stop signal: saved step ")[1].split()[0])
    assert 2 <= stopped_at < 16
    steps = [r["step"] for r in records(tmp_path / "run") if "loss" in r]
    assert steps[-1] == 16 and set(range(1, 17)) <= set(steps)
    assert (checkpoints / "step_00000014" / "COMPLETE").exists()  # the last one due; step 16 is final/
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def job_output(directory, job) -> str:
    """The job's output file. Several writers share it (the entrypoint, the trainer's stdout and its progress bars on
    stderr), so a multi-byte bar character can be split by another writer's line: decode leniently."""
    return (directory / f"job-{job}.out").read_text(errors="replace")
