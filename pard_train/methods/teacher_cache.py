"""The teacher cache (``method.teacher=cache``): what PARD-2 needs from its target, computed once per data set by
``python -m pard_train.teacher_cache`` (:mod:`pard_train.methods.teacher_cache_builder`) and read here every epoch.

Per packed row: ``log g(u)`` for every real token (float32; 0 at a document's first token) and, at every position
``p`` whose next token is a label (the positions the loss uses at any depth), the target's top-k token ids and their
log-probabilities at the KD temperature. A directory ``teacher-<fingerprint>`` beside the data cache holds one file
per shard of rows and ``manifest.json``, written last; the fingerprint covers each split's rows (tokens, documents,
loss mask), the target's files, k, the temperature and the storage dtype, so anything else is another directory and a
stale cache is never read.

KD over the top-k keeps **the remaining mass as one bucket**: the teacher's distribution is ``q_1..q_k`` plus
``r_T = 1 - sum q_i``, the student's ``s_1..s_k`` plus ``r_S``, and the term is the KL between these k+1-way
distributions. Why not renormalise over the top-k: that tells the student the target put all its mass on k tokens, so
it learns a sharper distribution than the target's (mass pulled out of the tail), and its KL cannot reach zero. The
bucket version is the exact KL of a coarser view of both distributions, so it is never more than the full KL, equals
it when ``r_T`` is 0 (k = vocabulary), and falls short by exactly ``tau^2 * r_T * KL(q_tail || s_tail)`` (the
conditional tails): a small tail mass bounds the error. Stored: ids as uint16 when the vocabulary fits (else int32),
log-probabilities as float16 (``method.top_k_dtype``), so 4k + 4 bytes per labelled token (6k + 4 above 65536 ids).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pard_train.data.dataset import rows_fingerprint
from pard_train.data.packing import PackedRow
from pard_train.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = 1


def labelled_positions(row: PackedRow) -> Tensor:
    """``[L]`` bool: position p has a label at some depth (x_{p+1} in the same document and supervised), as
    :func:`pard_train.layout.build_row` decides."""
    document = torch.tensor(row.document)
    supervised = torch.tensor(row.supervised, dtype=torch.bool)
    out = torch.zeros(document.numel(), dtype=torch.bool)
    out[:-1] = (document[1:] == document[:-1]) & supervised[1:]
    return out


def target_fingerprint(target: str) -> str:
    """The target by name and, for a local directory, its config and weight files' names, sizes and times (cheap:
    the weights are not read, and training from the cache never loads them)."""
    digest = hashlib.sha256(target.encode())
    directory = Path(target)
    if directory.is_dir():
        for path in sorted(directory.iterdir()):
            if path.suffix in (".json", ".safetensors", ".bin"):
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def cache_key(rows: dict[str, list[PackedRow]], target: str, top_k: int, temperature: float, dtype: str) -> dict:
    """What the cache's content depends on, part by part (so a refusal can name the part that changed)."""
    return {
        "format": FORMAT,
        **{f"rows.{split}": rows_fingerprint(split_rows) for split, split_rows in rows.items()},
        "target": target_fingerprint(target),
        "top_k": top_k,
        "kd_temperature": temperature,
        "top_k_dtype": dtype,
    }


def cache_directory(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(root) / f"teacher-{digest}"


@dataclass(frozen=True)
class Shard:
    split: str
    begin: int
    end: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.begin:08d}-{self.end:08d}.pt"


def plan_shards(rows: dict[str, list[PackedRow]], shard_rows: int) -> list[Shard]:
    return [
        Shard(split, begin, min(begin + shard_rows, len(split_rows)))
        for split, split_rows in rows.items()
        for begin in range(0, len(split_rows), shard_rows)
    ]


def _describe_difference(found: dict, wanted: dict) -> str:
    names = {"rows.train": "the training rows", "rows.validation": "the validation rows", "target": "the target"}
    changed = [names.get(key, f"method.{key}") for key in wanted if found.get(key) != wanted[key]]
    return ", ".join(changed) or "nothing recorded"


def top_k_kd(student_logits: Tensor, top_ids: Tensor, top_log_p: Tensor, tau: float) -> Tensor:
    """Per token ``tau^2 * KL`` between the teacher's top-k plus remaining-mass bucket and the student's same
    partition (module docstring); ``top_log_p`` are the teacher's log-probabilities at temperature ``tau``."""
    student_log_p = F.log_softmax(student_logits / tau, dim=-1)
    teacher_log_p = top_log_p.float()
    q = teacher_log_p.exp()
    kl = (q * (teacher_log_p - student_log_p.gather(-1, top_ids))).sum(-1)
    if top_ids.shape[-1] < student_logits.shape[-1]:  # k = vocabulary leaves no bucket (and no log of an empty sum)
        rest_teacher = (1.0 - q.sum(-1)).clamp(min=0.0)
        log_rest_student = torch.logsumexp(student_log_p.scatter(-1, top_ids, float("-inf")), dim=-1)
        kl = kl + torch.xlogy(rest_teacher, rest_teacher) - rest_teacher * log_rest_student
    return kl * tau**2


class TeacherCache:
    """A finished cache, memory-mapped: per split, the shards' tensors; per micro-batch, the signals as tensors."""

    def __init__(self, directory: Path, manifest: dict, rows: dict[str, list[PackedRow]]):
        self.directory, self.manifest, self.rows = directory, manifest, rows
        self.top_k = int(manifest["top_k"])
        self.vocabulary = int(manifest["vocabulary"])
        self.shards: dict[str, list[tuple[int, dict]]] = {}
        for entry in manifest["shards"]:
            # mmap: only the pages of the rows a step reads come into memory; a cache larger than RAM still works.
            data = torch.load(directory / entry["name"], mmap=True, weights_only=True)
            self.shards.setdefault(entry["split"], []).append((entry["begin"], data))
        for parts in self.shards.values():
            parts.sort(key=lambda part: part[0])

    @classmethod
    def open(cls, root: Path, rows: dict[str, list[PackedRow]], target: str, settings) -> TeacherCache:
        """The cache for these rows and settings, or a one-line ConfigError saying what differs from the caches
        that exist and how to build the right one."""
        key = cache_key(rows, target, settings.top_k, settings.kd_temperature, settings.top_k_dtype)
        directory = cache_directory(root, key)
        build = "build it with `python -m pard_train.teacher_cache` and the same config and overrides as training"
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            others = []
            for path in sorted(Path(root).glob(f"teacher-*/{MANIFEST}")):
                try:
                    others.append(json.loads(path.read_text())["key"])
                except (OSError, ValueError, KeyError):
                    continue
            if not others:
                raise ConfigError(f"method.teacher=cache: no teacher cache in {root}; {build}") from None
            changed = min((_describe_difference(other, key) for other in others), key=len)
            raise ConfigError(
                f"method.teacher=cache: the teacher cache in {root} is stale (built for other {changed}); {build}"
            ) from None
        for entry in manifest["shards"]:
            path = directory / entry["name"]
            size = path.stat().st_size if path.exists() else None
            if size != entry["bytes"]:
                raise ConfigError(
                    f"method.teacher=cache: {path} is missing or has {size} bytes, its manifest says "
                    f"{entry['bytes']}; delete {directory} and {build}"
                )
        return cls(directory, manifest, rows)

    def _row(self, split: str, row: int) -> tuple[Tensor, Tensor, Tensor]:
        parts = self.shards[split]
        begin, data = parts[bisect.bisect_right([b for b, _ in parts], row) - 1]
        local = row - begin
        real = data["real_offsets"][local : local + 2].tolist()
        labelled = data["label_offsets"][local : local + 2].tolist()
        return (
            data["log_g"][real[0] : real[1]],
            data["top_ids"][labelled[0] : labelled[1]],
            data["top_log_p"][labelled[0] : labelled[1]],
        )

    def signals(self, split: str, row_ids: list[int], length: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """``log g`` ``[B, length]`` float64 and the top-k ids (long) and log-probabilities (float32)
        ``[B, length, k]`` of the rows, at their labelled positions (zeros elsewhere: never read)."""
        batch = len(row_ids)
        log_g = torch.zeros(batch, length, dtype=torch.float64)
        ids = torch.zeros(batch, length, self.top_k, dtype=torch.long)
        log_p = torch.zeros(batch, length, self.top_k, dtype=torch.float32)
        for i, row in enumerate(row_ids):
            row_log_g, row_ids_k, row_log_p = self._row(split, row)
            n = min(row_log_g.numel(), length)
            log_g[i, :n] = row_log_g[:n].double()
            positions = labelled_positions(self.rows[split][row]).nonzero().squeeze(-1)
            keep = positions < length
            ids[i, positions[keep]] = row_ids_k[keep].long()
            log_p[i, positions[keep]] = row_log_p[keep].float()
        return log_g.to(device), ids.to(device), log_p.to(device)
