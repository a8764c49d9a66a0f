"""Train-state checkpoints: when to save, how (atomically, collectively, verifiably), what to resume from, which one
is best.

Layout of a run directory (shared by all ranks, on a filesystem every node sees)::

    <run>/run.lock                      the run that owns the directory (pard_train.runlock)
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
step of a save agrees across ranks on failure: a full disk or a read-only directory on any rank removes the staging
directory and raises one :class:`CheckpointSaveError` on every rank, and the previous checkpoint is untouched.

Loading executes no code from the run directory where torch allows it: weights are safetensors, the optimizer and
RNG states go through accelerate's ``torch.load(weights_only=True)`` (numpy arrays allow-listed), the scheduler state
through ``torch.load(weights_only=True)`` here (accelerate would unpickle a registered object fully). What remains:
under DeepSpeed, ``engine.load_checkpoint`` unpickles its shards with ``weights_only=False``; the manifest proves
the files are the ones written, not that whoever can write the run directory is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pard_train.atomic import atomic_write_text, fsync_directory
from pard_train.config import CheckpointConfig, Config, FeatureCapture
from pard_train.errors import CheckpointSaveError, ResumeError
from pard_train.model import DraftSpec

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
STATE_FILE = "train_state.json"
SCHEDULER_FILE = "scheduler.pt"
DAMAGED = "damaged"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _save_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, or the errno wrapped by torch.save's zip writer (RuntimeError "file write
    failed") and by safetensors (SafetensorError "IoError ... StorageFull"). Other exceptions are bugs."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


@dataclass
class TrainState:
    """What a checkpoint records besides tensors: where training is, and the settings that define the method."""

    step: int
    """Optimizer steps done; the data position follows from it (the data order is a function of seed and step)."""
    method: dict
    """Settings that change what is learned; a resume with different values is refused."""
    rows_per_step: int
    """Global batch in packed rows; a different value would map steps onto different samples."""
    num_processes: int
    best_al: float | None = None
    extra: dict = field(default_factory=dict)
    data: str | None = None
    """Fingerprint of the packed training rows (``TrainingData.fingerprint``): the samples the steps map onto."""


def method_settings(config: Config, spec: DraftSpec, model: str | None = None) -> dict:
    """The settings that define the PARD method of a run: a checkpoint made with other values is another model.
    ``model`` identifies the model by content (:func:`pard_train.model_identity.model_fingerprint`), not by path."""
    return {
        "pard.num_draft_tokens": config.pard.num_draft_tokens,
        "pard.drop_tokens": config.pard.drop_tokens,
        "pard.drop_ratio": config.pard.drop_ratio,
        "pard.drop_ratio_min": config.pard.drop_ratio_min,
        "model.mask_token_id (resolved)": spec.mask_token_id,
        "model (files)": model or config.model.path,
        # Only set for derived drafts, so checkpoints of other runs keep matching.
        **({"model.keep_layers": config.model.keep_layers} if config.model.keep_layers is not None else {}),
        "method.name": config.method.name.value,
        **_method_details(config),
    }


def _method_details(config: Config) -> dict:
    """PARD-2's settings (a PARD run has none beyond its name)."""
    if config.method.name.value == "pard":
        return {}
    method = config.method
    keys = ("target", "ce_weight", "kd_weight", "kd_temperature", "cat", "features", "feature_scale", "feature_drop")
    details = {f"method.{key}": getattr(method, key) for key in keys} | {
        "method.feature_layers": list(method.feature_layers)
    }
    if method.features:  # without features no target state is read: the capture changes nothing
        details["method.feature_capture"] = FeatureCapture(method.feature_capture).value
    return details


def check_resumable(saved: TrainState, current: TrainState, where: Path, deepspeed: bool) -> None:
    """Raise ResumeError naming every method setting that differs, or a batch/world change that breaks exactness."""
    recorded = {"method.name": "pard", **saved.method}  # checkpoints from before the method switch are PARD
    if recorded["method.name"] == "pard2" and recorded.get("method.features"):
        # PARD-2 checkpoints from before method.feature_capture trained on HF hidden_states.
        recorded.setdefault("method.feature_capture", FeatureCapture.training.value)
    changed = [
        f"{key}: checkpoint {recorded.get(key)!r}, now {value!r}"
        for key, value in current.method.items()
        if recorded.get(key) != value and (key in recorded or key != "model (files)")  # older ones named a path
    ]
    if changed:
        raise ResumeError(
            f"{where} was trained with other method settings ({'; '.join(changed)}): "
            "restore them, or start a new run with another run.name / run.dir"
        )
    if saved.data is not None and current.data is not None and saved.data != current.data:
        raise ResumeError(
            f"{where} was trained on other data (fingerprint {saved.data}, now {current.data}): the step count "
            "would map onto other samples; restore the training files, or start a new run with another run.name / "
            "run.dir (or checkpoint.resume=false to start over in this one)"
        )
    if saved.rows_per_step != current.rows_per_step:
        raise ResumeError(
            f"{where}: the global batch was {saved.rows_per_step} packed rows per step, now {current.rows_per_step} "
            "(micro_batch_size x grad_accum_steps x processes): keep it, or start a new run"
        )
    if deepspeed and saved.num_processes != current.num_processes:
        raise ResumeError(
            f"{where}: DeepSpeed shards were written by {saved.num_processes} processes, now {current.num_processes}: "
            "resume with the same number of processes"
        )


class Checkpoints:
    """Save, find, verify and load train-state checkpoints of one run directory, collectively over all ranks.

    It decides its own cadence (:meth:`maybe_save`), keeps the best one (:meth:`offer_best`) and resumes
    (:meth:`resume`), so the training loop only tells it where training is."""

    def __init__(
        self,
        run_dir: str | Path,
        accelerator,
        keep_last: int,
        *,
        every_steps: int = 0,
        config_yaml: str = "",
        scheduler=None,
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.accelerator, self.keep_last = accelerator, keep_last
        self.every_steps, self.config_yaml = every_steps, config_yaml
        self.scheduler = scheduler
        """Saved and loaded here with ``weights_only`` (not registered with accelerate, which unpickles it fully)."""
        self.last_step: int | None = None
        """Step of the checkpoint this process last wrote or loaded."""

    @classmethod
    def build(
        cls, config: CheckpointConfig, run_dir: str | Path, accelerator, config_yaml: str, scheduler=None
    ) -> Checkpoints:
        return cls(
            run_dir,
            accelerator,
            config.keep_last,
            every_steps=config.every_steps,
            config_yaml=config_yaml,
            scheduler=scheduler,
        )

    def resume(self, state: TrainState, deepspeed: bool) -> TrainState:
        """Restore the newest valid checkpoint if there is one (refusing one made with other method settings or
        data); return the state to continue from (collective)."""
        found = self.choose()
        if found is None:
            return state
        latest, saved = found
        check_resumable(saved, state, latest, deepspeed)
        loaded = self.load(latest, saved)
        if self.accelerator.is_main_process:
            print(f"resuming from {latest} (step {loaded.step})", flush=True)
        return replace(state, step=loaded.step, best_al=loaded.best_al)

    def remove_leftovers(self) -> list[str]:
        """Remove staging directories of saves that died (``.step_N.partial``), whatever their step: with another
        ``every_steps`` no later save would reuse the name, and each holds a model and optimizer copy. Main process,
        under the run lock (no live save can own one)."""
        removed = []
        if self.root.is_dir():
            for path in sorted(self.root.glob(".step_*.partial")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    def choose(self) -> tuple[Path, TrainState] | None:
        """The newest complete checkpoint whose files match its manifest, and its state (collective).

        Rank 0 lists and reads, and every rank gets its answer: ranks on other nodes may list a shared directory
        from a stale cache. Damaged checkpoints are moved to ``checkpoints/damaged``; if all are, ResumeError."""
        acc = self.accelerator

        def listing():
            found = reversed(self.complete())
            return [(str(path), _read_json(path / MANIFEST), _read_json(path / STATE_FILE)) for path in found]

        problems = []
        for path, manifest, state in _from_main(acc, listing, f"cannot list {self.root}"):
            path = Path(path)
            wrong = self._verify(path, manifest)  # train_state.json is in the manifest: verified with the rest
            if not wrong:
                return path, TrainState(**state)
            problems.append(f"{path.name}: {wrong}")
            if acc.is_main_process:
                aside = _move_aside(path, self.root / DAMAGED)
                print(f"checkpoint {path} is damaged ({wrong}); moved to {aside}, trying the previous one", flush=True)
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
        found = _hash_together(self.accelerator, path, {name: entry["size"] for name, entry in expected.items()})
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

    def maybe_save(self, state: TrainState, last_step: int) -> None:
        """Save every ``every_steps`` steps; the last step is exported instead (collective)."""
        if self.every_steps > 0 and state.step % self.every_steps == 0 and state.step < last_step:
            self.save_unless_saved(state)

    def save_unless_saved(self, state: TrainState) -> None:
        """Checkpoint ``state`` unless that step is already saved (collective: every rank decides alike)."""
        if state.step > 0 and self.last_step != state.step:
            self.save(state)

    def offer_best(self, state: TrainState, score: float) -> TrainState:
        """A new best score is checkpointed (if not already) and becomes ``checkpoints/best`` (collective)."""
        if state.best_al is not None and score <= state.best_al:
            return state
        state = replace(state, best_al=score)
        self.save_unless_saved(state)
        self.mark_best(state.step)
        return state

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

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
            atomic_write_text(staging / STATE_FILE, json.dumps(asdict(state), indent=1))
            atomic_write_text(staging / "config.yaml", self.config_yaml)
            return {name: (staging / name).stat().st_size for name in _files(staging)}

        def publish(manifest: dict) -> None:
            atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1))
            atomic_write_text(staging / COMPLETE, f"{state.step}\n")  # last: the manifest is on disk before it
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_directory(self.root)

        together = _Together(acc, f"step {state.step}: could not save a checkpoint", staging, self._previous())
        together(prepare, main_only=True)
        together(lambda: acc.save_state(str(staging)))
        sizes = together(write_own, main_only=True)[0]
        share = _shares(sizes, acc.num_processes)[acc.process_index]
        found = {}
        for part in together(lambda: {name: _digest(staging / name, strict=True) for name in share}):
            found.update(part)
        files = {name: {"size": found[name][0], "sha256": found[name][1]} for name in sorted(sizes)}
        together(lambda: publish({"algorithm": "sha256", "files": files}), main_only=True)
        if acc.is_main_process:
            self._prune()
        self.last_step = state.step
        return final

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
        _Together(self.accelerator, what, temp, "the checkpoint itself is saved")(swap, main_only=True)
        if self.accelerator.is_main_process:
            self._prune()

    def best(self) -> Path | None:
        link = self.root / "best"
        return link.resolve() if link.is_symlink() and (link.resolve() / COMPLETE).is_file() else None

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and the best one; drop leftovers of dead saves."""
        best = self.best()
        for path in self.complete()[: -self.keep_last]:
            if best is None or path.resolve() != best:
                shutil.rmtree(path, ignore_errors=True)


class _Together:
    """Run one part of a save on every rank (or rank 0) and agree on failure: the gather is also the barrier.

    Returns every rank's result, in rank order. If any rank failed to write, rank 0 removes the staging directory
    and every rank raises the same one-line CheckpointSaveError (a rank that raised alone would leave the others
    waiting at the next collective)."""

    def __init__(self, accelerator, what: str, staging: Path, previous: str):
        self.accelerator, self.what, self.staging, self.previous = accelerator, what, staging, previous

    def __call__(self, action: Callable, main_only: bool = False) -> list:
        acc = self.accelerator
        result, error = None, None
        if acc.is_main_process or not main_only:
            try:
                result = action()
            except _save_errors() as failure:
                error = _cause(failure, self.staging.parent)
        gathered = _gather(acc, (error, result))
        failed = [(rank, error) for rank, (error, _) in enumerate(gathered) if error]
        if failed:
            if acc.is_main_process:
                shutil.rmtree(self.staging, ignore_errors=True)
                if self.staging.is_symlink():
                    self.staging.unlink(missing_ok=True)
            rank, cause = failed[0]
            where = f" (rank {rank})" if acc.num_processes > 1 else ""
            left = "could not be removed" if self.staging.exists() else "was removed"
            raise CheckpointSaveError(
                f"{self.what} in {self.staging.parent}: {cause}{where}; "
                f"the unfinished {self.staging.name} {left} and {self.previous}: free space or fix permissions, "
                "then rerun the same command to resume"
            )
        return [result for _, result in gathered]


def _gather(accelerator, value) -> list:
    """Every rank's ``value``, in rank order, on every rank (a collective, so also a barrier)."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def _cause(error: BaseException, directory: Path | None = None) -> str:
    """One line: the OS error and its file, or a wrapped one with what the filesystem says (torch.save reports a
    full disk as "unexpected pos ...", safetensors as "IoError(...)")."""
    if isinstance(error, OSError):
        text = error.strerror or str(error)
        return f"{text} ({error.filename})" if error.filename else text
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
    if directory is not None:
        try:
            free = shutil.disk_usage(directory).free
            writable = os.access(directory, os.W_OK)
            text += f" ({free / 2**20:.1f} MiB free{'' if writable else ', not writable'} in {directory})"
        except OSError:
            pass
    return text


def _from_main(accelerator, read: Callable, what: str):
    """``read()`` on rank 0, its result on every rank; a failure there becomes a ResumeError everywhere."""
    box = [None]
    if accelerator.is_main_process:
        try:
            box = [(read(), None)]
        except OSError as error:
            box = [(None, f"{what}: {_cause(error)}")]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(box)
    result, error = box[0]
    if error:
        raise ResumeError(error)
    return result


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
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if expected_size is not None and size != expected_size:
                return size, None, None
            digest = hashlib.sha256()
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
            return size, digest.hexdigest(), None
    except OSError as error:
        if strict:
            raise
        return -1, None, "missing" if isinstance(error, FileNotFoundError) else _cause(error)


def _hash_together(accelerator, directory: Path, sizes: dict[str, int]) -> dict[str, tuple]:
    """``_digest`` of every file, each rank reading a share; every rank gets all (collective)."""
    share = _shares(sizes, accelerator.num_processes)[accelerator.process_index]
    found = {}
    for part in _gather(accelerator, {name: _digest(directory / name, sizes[name]) for name in share}):
        found.update(part)
    return found


def _move_aside(path: Path, damaged: Path) -> Path:
    damaged.mkdir(exist_ok=True)
    target, number = damaged / path.name, 1
    while target.exists():
        target, number = damaged / f"{path.name}.{number}", number + 1
    os.replace(path, target)
    return target


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _torch_save(value, path: Path) -> None:
    import torch

    torch.save(value, path)


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE_FILE).read_text()))
