"""The checkpoint store of one run directory: staged saves with a manifest, verification, fallback to the previous
checkpoint, loading. When to save and which checkpoints to keep is :mod:`pard_train.run.checkpoint`'s decision.

Layout of a run directory (shared by all ranks, on a filesystem every node sees)::

    <run>/run.lock                      the run that owns the directory (pard_train.run.runlock)
    <run>/checkpoints/step_00000040/   accelerate's save_state (model, optimizer, RNG of every rank; DeepSpeed shards
                                        under DeepSpeed) + scheduler.pt + train_state.json + config.yaml
                                        + MANIFEST.json (size and sha256 of every file) + COMPLETE
    <run>/checkpoints/best -> step_...  the checkpoint with the best score of the evaluator that selects it
                                        (measured AL when measured, else held-out estimated AL)
    <run>/checkpoints/damaged/          checkpoints a resume found not to match their manifest, moved aside
    <run>/final/                        the trained draft as a Hugging Face checkpoint

All ranks write into ``.step_N.partial``; rank 0 writes the manifest (the ranks hash shares of the files), then
``COMPLETE``, and renames it into place. A directory without ``COMPLETE`` (a crash, a copy, a half-synced filesystem)
is never resumed from; one whose files differ from its manifest is moved aside and the previous one is used. Every
step of a save agrees across ranks on failure (:func:`pard_train.run.distributed.together`): a full disk or a read-only
directory on any rank removes the staging directory and raises one :class:`CheckpointSaveError` on every rank, and
the previous checkpoint is untouched.

Loading executes no code from the run directory where torch allows it: weights are safetensors, the optimizer and
RNG states go through accelerate's ``torch.load(weights_only=True)`` (numpy arrays allow-listed), the scheduler state
through ``torch.load(weights_only=True)`` here (accelerate would unpickle a registered object fully). What remains:
under DeepSpeed, ``engine.load_checkpoint`` unpickles its shards with ``weights_only=False``; the manifest proves
the files are the ones written, not that whoever can write the run directory is trusted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pard_train.base.atomic import (
    atomic_write_text,
    default_modes,
    describe_error,
    fsync_directory,
    move_aside,
    sha256_file,
)
from pard_train.base.errors import CheckpointSaveError, ResumeError
from pard_train.run.distributed import gather_all, on_main, together
from pard_train.run.train_state import STATE_FILE, TrainState, read_state

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
SCHEDULER_FILE = "scheduler.pt"
DAMAGED = "damaged"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _save_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, or the errno wrapped by torch.save's zip writer (RuntimeError "file write
    failed") and by safetensors (SafetensorError "IoError ... StorageFull"). Other exceptions are bugs."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


class CheckpointStore:
    """Write, find, verify and load the train-state checkpoints of one run directory, collectively over all ranks."""

    def __init__(self, run_dir: str | Path, accelerator, *, config_yaml: str = "", scheduler=None):
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator, self.config_yaml = accelerator, config_yaml
        self.scheduler = scheduler
        """Saved and loaded here with ``weights_only`` (not registered with accelerate, which unpickles it fully)."""
        self.last_step: int | None = None
        """Step of the checkpoint this process last wrote or loaded."""

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def best(self) -> Path | None:
        link = self.root / "best"
        return link.resolve() if link.is_symlink() and (link.resolve() / COMPLETE).is_file() else None

    def remove(self, path: Path) -> None:
        """Delete one checkpoint (main process; the caller decides which)."""
        shutil.rmtree(path, ignore_errors=True)

    def remove_leftovers(self) -> list[str]:
        """Remove staging directories of saves that died (``.step_N.partial``), whatever their step: with another
        ``every_steps`` no later save would reuse the name, and each holds a model and optimizer copy; and the final
        export's (``.final.partial-*`` in the run directory), which a finished run never writes again. Main process,
        under the run lock (no live save or export can own one)."""
        leftovers = [*self.root.glob(".step_*.partial"), *self.root.parent.glob(".final.partial-*")]
        for path in sorted(leftovers):
            shutil.rmtree(path, ignore_errors=True)
        return [path.name for path in sorted(leftovers)]

    def choose(self) -> tuple[Path, TrainState] | None:
        """The newest complete checkpoint whose files match its manifest, and its state (collective).

        Rank 0 lists and reads, and every rank gets its answer: ranks on other nodes may list a shared directory
        from a stale cache. Damaged checkpoints are moved to ``checkpoints/damaged``; if all are, ResumeError."""
        acc = self.accelerator

        def listing():
            try:
                found = reversed(self.complete())
                return [(str(path), _read_json(path / MANIFEST), _read_json(path / STATE_FILE)) for path in found]
            except OSError as error:
                raise ResumeError(f"cannot list {self.root}: {describe_error(error)}") from None

        problems = []
        for path, manifest, state in on_main(acc, listing):
            path = Path(path)
            wrong = self._verify(path, manifest)  # train_state.json is in the manifest: verified with the rest
            if not wrong:
                return path, TrainState.from_dict(state)
            problems.append(f"{path.name}: {wrong}")
            if acc.is_main_process:
                aside = move_aside(path, self.root / DAMAGED)
                logger.warning(f"checkpoint {path} is damaged ({wrong}); moved to {aside}, trying the previous one")
        if problems:
            raise ResumeError(
                f"no valid checkpoint in {self.root} ({'; '.join(problems)}); they were moved to "
                f"{self.root / DAMAGED}: rerun to train from step 0, or move one back once repaired"
            )
        return None

    def _verify(self, path: Path, manifest: dict | None) -> str:
        """What differs between ``path`` and its manifest, empty if nothing (collective: ranks hash shares)."""
        if manifest is None:
            return f"{MANIFEST} is missing or unreadable"
        expected = manifest["files"]
        found = self._hash_together(path, {name: entry["size"] for name, entry in expected.items()})
        wrong = []
        for name, entry in expected.items():
            size, digest, error = found[name]
            if error:
                wrong.append(f"{name}: {error}")
            elif size != entry["size"]:
                wrong.append(f"{name} has {size} bytes, its manifest says {entry['size']}")
            elif digest != entry["sha256"]:
                wrong.append(f"{name} does not match its sha256 in {MANIFEST}")
        return ", ".join(wrong)

    def _hash_together(self, directory: Path, sizes: dict[str, int]) -> dict[str, tuple]:
        """``_digest`` of every file, each rank reading a share; every rank gets all (collective)."""
        acc = self.accelerator
        share = _shares(sizes, acc.num_processes)[acc.process_index]
        found = {}
        for part in gather_all(acc, {name: _digest(directory / name, sizes[name]) for name in share}):
            found.update(part)
        return found

    def save(self, state: TrainState) -> Path:
        """Write the checkpoint of ``state.step`` atomically, with its manifest; every rank must call this.

        Raises CheckpointSaveError on every rank if any rank fails to write (staging removed, previous kept)."""
        acc = self.accelerator
        final = self.path_for(state.step)
        staging = self.root / f".{final.name}.partial"

        def prepare():
            self.root.mkdir(parents=True, exist_ok=True)
            if staging.exists():
                shutil.rmtree(staging)  # left by a run that died while saving (the run lock excludes a live one)

        def write_own() -> dict[str, int]:
            if self.scheduler is not None:
                _torch_save(self.scheduler.state_dict(), staging / SCHEDULER_FILE)
            atomic_write_text(staging / STATE_FILE, state.to_json())
            atomic_write_text(staging / "config.yaml", self.config_yaml)
            return {name: (staging / name).stat().st_size for name in _files(staging)}

        def publish(manifest: dict) -> None:
            atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
            atomic_write_text(staging / COMPLETE, f"{state.step}\n")  # last: the manifest is on disk before it
            default_modes(staging)  # safetensors writes 0600: every file as a plain open would (0644 under umask 022)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_directory(self.root)

        step = self._stage(f"step {state.step}: could not save a checkpoint", staging, self._previous())
        step(prepare, main_only=True)
        step(lambda: acc.save_state(str(staging)))
        sizes = step(write_own, main_only=True)[0]
        share = _shares(sizes, acc.num_processes)[acc.process_index]
        found = {}
        for part in step(lambda: {name: _digest(staging / name, strict=True) for name in share}):
            found.update(part)
        files = {name: {"size": found[name][0], "sha256": found[name][1]} for name in sorted(sizes)}
        step(lambda: publish({"algorithm": "sha256", "files": files}), main_only=True)
        self.last_step = state.step
        return final

    def _stage(self, what: str, staging: Path, previous: str) -> Callable[..., list]:
        """One part of a save on every rank (or rank 0), agreed on: if any rank failed to write, rank 0 removes
        ``staging`` and every rank raises the same one-line CheckpointSaveError. Returns every rank's result."""
        acc = self.accelerator

        def step(action: Callable, main_only: bool = False) -> list:
            results, failed = together(
                acc,
                action,
                main_only=main_only,
                catch=_save_errors(),
                describe=lambda error: describe_error(error, staging.parent),
            )
            if failed is None:
                return results
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
                if staging.is_symlink():
                    staging.unlink(missing_ok=True)
            rank, cause = failed
            where = f" (rank {rank})" if acc.num_processes > 1 else ""
            left = "could not be removed" if staging.exists() else "was removed"
            raise CheckpointSaveError(
                f"{what} in {staging.parent}: {cause}{where}; the unfinished {staging.name} {left} and {previous}: "
                "free space or fix permissions, then rerun the same command to resume"
            )

        return step

    def _previous(self) -> str:
        return f"{self.path_for(self.last_step).name} is untouched" if self.last_step else "no earlier one existed"

    def load(self, path: Path, state: TrainState | None = None) -> TrainState:
        """Restore model, optimizer, scheduler and RNG from ``path`` on every rank; return its TrainState (``state``
        when the caller has it from rank 0)."""
        import torch

        self.accelerator.load_state(str(path))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
        state = state or read_state(path)
        self.last_step = state.step
        return state

    def mark_best(self, step: int) -> None:
        """Point ``checkpoints/best`` at the checkpoint of ``step`` (atomic symlink swap by rank 0; collective)."""
        link, temp = self.root / "best", self.root / ".best.tmp"

        def swap():
            if temp.is_symlink() or temp.exists():
                temp.unlink()
            temp.symlink_to(self.path_for(step).name)
            os.replace(temp, link)

        what = f"step {step}: could not point checkpoints/best at the new best"
        self._stage(what, temp, "the checkpoint itself is saved")(swap, main_only=True)


def _files(directory: Path) -> list[str]:
    """Every file below ``directory`` (relative, sorted), except the manifest and marker written after them."""
    return sorted(
        str(path.relative_to(directory))
        for path in directory.rglob("*")
        if path.is_file() and path.name not in (MANIFEST, COMPLETE)
    )


def _shares(sizes: dict[str, int], ranks: int) -> list[list[str]]:
    """Files split over ranks, biggest first onto the least loaded, so each rank reads about as much."""
    loads, shares = [0] * ranks, [[] for _ in range(ranks)]
    for name in sorted(sizes, key=lambda name: (-sizes[name], name)):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += sizes[name]
    return shares


def _digest(path: Path, expected_size: int | None = None, strict: bool = False) -> tuple[int, str | None, str | None]:
    """``(size, sha256, error)`` of a file; a size other than ``expected_size`` is not worth reading. ``strict``
    raises read errors instead of reporting them."""
    try:
        size = path.stat().st_size
        if expected_size is not None and size != expected_size:
            return size, None, None
        return size, sha256_file(path), None
    except OSError as error:
        if strict:
            raise
        return -1, None, "missing" if isinstance(error, FileNotFoundError) else describe_error(error)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _torch_save(value, path: Path) -> None:
    import torch

    torch.save(value, path)
