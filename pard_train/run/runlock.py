"""One run per run directory: an exclusive lock file, ``<run>/run.lock``, held from start to exit.

The lock is a small JSON file naming its owner (host, PID, the process's start time, SLURM job id and restart
count, a random token). It is taken by creating it with ``os.link`` from a private temporary file: ``link`` is atomic
and fails with EEXIST on every POSIX filesystem, NFS included (NFSv2 ``O_EXCL`` was not; ``flock`` is emulated with
byte-range locks on NFS and refused on Lustre without ``-o flock``), and the lock appears with its content already
written, so a reader never sees an empty lock. An NFS retransmission can report EEXIST for a link that did succeed;
the temporary file then has two links, which is checked. Where hard links are not supported, ``O_EXCL`` creation
(atomic on NFSv3 and later) is used instead.

A lock whose owner is gone is taken over with a message: the same host and a PID that no longer runs (or now runs
another process, told by its start time), or the same SLURM job id with another ``SLURM_RESTART_COUNT`` (SLURM runs
one instance of a job at a time, so a requeued job owns what its previous instance left). Taking over renames the
stale file aside first; if the renamed file is not the stale one that was read (another launcher got there first),
it is put back and the launch is refused. Anything else is refused in one line naming the owner and the file to
delete if that owner is known to be gone (a job killed on another node).

Only the main process of a job takes the lock; the other ranks learn the outcome from it (:func:`hold_run_lock`),
so a job never locks itself out and every rank fails alike when the directory is taken.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pard_train.base.errors import RunLockedError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), which tells a reused PID from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Owner:
    host: str
    pid: int
    pid_start: str | None
    slurm_job: str | None
    slurm_restart: str | None
    started: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        job = os.environ.get("SLURM_JOB_ID")
        return cls(
            host=socket.gethostname(),
            pid=pid,
            pid_start=_process_start(pid),
            slurm_job=job,
            slurm_restart=os.environ.get("SLURM_RESTART_COUNT", "0") if job else None,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job} (restart {self.slurm_restart})" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"

    def gone_because(self, me: Owner) -> str | None:
        """Why this owner cannot be running any more, or None when it may still be."""
        if self.slurm_job and self.slurm_job == me.slurm_job and self.slurm_restart != me.slurm_restart:
            return f"SLURM requeued job {self.slurm_job} (restart {self.slurm_restart} -> {me.slurm_restart})"
        if self.host != me.host:
            return None  # another machine's processes cannot be checked from here
        if self.pid == me.pid:
            return "this process left it"
        start = _process_start(self.pid)
        if start is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return f"pid {self.pid} is not running"
            except PermissionError:
                return None  # it runs, as another user
            return None
        if self.pid_start is not None and start != self.pid_start:
            return f"pid {self.pid} is now another process"
        return None


def _read(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Unreadable or foreign content: treat as held by an unknown owner rather than deleting what we don't know.
        return Owner("unknown", -1, None, None, None, "unknown", token="unreadable")


class RunLock:
    """Context manager holding ``<run_dir>/run.lock``; raises :class:`RunLockedError` if another run holds it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.owner = Owner.me()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover that loses a race goes round again, once or twice
            if self._create():
                return
            holder = _read(self.path)
            if holder is None:
                continue  # released between our attempt and the read
            reason = holder.gone_because(self.owner)
            if reason is None:
                raise RunLockedError(
                    f"{self.path.parent} is in use by another run ({holder.describe()}): wait for it to end or "
                    f"train into another run.name / run.dir; if that run is gone, delete {self.path}"
                )
            if self._take_over(holder):
                logger.warning(
                    f"run lock: took over {self.path} from a run that is gone ({holder.describe()}: {reason})"
                )
                return
        raise RunLockedError(f"{self.path.parent}: could not take {self.path}: other launches keep taking it")

    def _create(self) -> bool:
        temp = self.path.with_name(f".{LOCK_FILE}.{self.owner.host}.{self.owner.pid}.{self.owner.token[:8]}")
        temp.write_text(json.dumps(asdict(self.owner)))
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return os.stat(temp).st_nlink == 2  # an NFS retransmitted link that did succeed
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self._create_exclusive()  # a filesystem without hard links (some FUSE and SMB mounts)
        finally:
            temp.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        """``O_EXCL`` creation, then the content: a reader in between sees an unreadable lock and refuses."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(asdict(self.owner)))
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _take_over(self, stale: Owner) -> bool:
        aside = self.path.with_name(f".{LOCK_FILE}.stale.{self.owner.token[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()
        moved = _read(aside)
        if moved is not None and moved.token != stale.token:
            # Another launcher replaced the stale lock before us: that one is live, give it back.
            with suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def release(self) -> None:
        """Remove the lock if it is still ours (a takeover by a requeued job must not be undone by the old one)."""
        holder = _read(self.path)
        if holder is not None and holder.token == self.owner.token:
            try:
                self.path.unlink(missing_ok=True)
            except OSError as error:  # a read-only run dir: keep the real error; the next launch takes it over
                logger.warning(f"run lock: could not remove {self.path} ({error.strerror or error})")


@contextmanager
def hold_run_lock(run_dir: str | Path, accelerator) -> Iterator[None]:
    """Lock ``run_dir`` for this job: the main process takes the lock, every rank raises if it could not.

    The outcome is broadcast, so ranks on other nodes neither race for the lock nor wait forever at a later
    collective when the main process refuses to start."""
    lock = RunLock(run_dir) if accelerator.is_main_process else None
    outcome = [None]
    if lock is not None:
        try:
            lock.acquire()
        except RunLockedError as error:
            outcome = [str(error)]
        except OSError as error:  # a read-only or inaccessible run directory
            outcome = [f"{run_dir}: cannot write the run lock {lock.path} ({error.strerror or error})"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise RunLockedError(outcome[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
