"""The teacher cache (``method.teacher=cache``): what PARD-2 needs from its target, computed once per data set by
``python -m pard_train.teacher_cache`` (:mod:`pard_train.methods.teacher_cache_builder`) and read here every epoch.

Per packed row: ``log g(u)`` for every real token (float32; 0 at a document's first token) and, at every position
``p`` whose next token is a label (the positions the loss uses at any depth), the target's top-k token ids and their
log-probabilities at the KD temperature; with ``method.features``, also the target's features ``[real tokens,
n * H]`` at ``method.feature_layers`` as ``method.feature_capture`` says (``method.feature_cache_dtype``: bfloat16,
the target's dtype on GPUs, or float32), so dual mode trains without the target too. A directory
``teacher-<fingerprint>`` beside the data cache holds one file per shard of rows and ``manifest.json``, written last;
the fingerprint covers each split's rows (tokens, documents, loss mask), the target's files, k, the temperature and
the storage dtype (with features: their layers, capture and dtype), so anything else is another directory and a
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
from torch import Tensor

from pard_train.base.config import FeatureCapture
from pard_train.base.errors import ConfigError
from pard_train.data.packing import PackedRow

MANIFEST = "manifest.json"
FORMAT = 1

RowSignals = tuple[Tensor, Tensor, Tensor, Tensor | None]
"""One row's part of a shard: ``log g`` ``[L]`` float32, the top-k ids and log-probabilities ``[labelled, k]`` and
the features ``[L, n * H]`` (None without ``method.features``)."""


def labelled_positions(row: PackedRow) -> Tensor:
    """``[L]`` bool: position p has a label at some depth (x_{p+1} in the same document and supervised), as
    :func:`pard_train.core.layout.build_row` decides."""
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


def cache_key(rows: dict[str, list[PackedRow]], target: str, settings) -> dict:
    """What the cache's content depends on, part by part (so a refusal can name the part that changed); the feature
    parts only with ``settings.features``, so a cache without features keeps the key it always had."""
    from pard_train.data.dataset import rows_fingerprint  # here: the loss imports this module, not the data stack

    key = {
        "format": FORMAT,
        **{f"rows.{split}": rows_fingerprint(split_rows) for split, split_rows in rows.items()},
        "target": target_fingerprint(target),
        "top_k": settings.top_k,
        "kd_temperature": settings.kd_temperature,
        "top_k_dtype": settings.top_k_dtype,
    }
    if settings.features:
        key["feature_layers"] = list(settings.feature_layers)
        key["feature_capture"] = FeatureCapture(settings.feature_capture).value
        key["feature_cache_dtype"] = settings.feature_cache_dtype
    return key


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
    if ("feature_layers" in found) != ("feature_layers" in wanted):  # one with features, the other without
        names |= {key: "method.features" for key in ("feature_layers", "feature_capture", "feature_cache_dtype")}
    changed = [names.get(key, f"method.{key}") for key in {**found, **wanted} if found.get(key) != wanted.get(key)]
    return ", ".join(dict.fromkeys(changed)) or "nothing recorded"


def top_k_kd(student_logits: Tensor, top_ids: Tensor, top_log_p: Tensor, tau: float) -> Tensor:
    """Per token ``tau^2 * KL`` between the teacher's top-k plus remaining-mass bucket and the student's same
    partition (module docstring); ``top_log_p`` are the teacher's log-probabilities at temperature ``tau``."""
    kl, _ = _BucketKL.apply(student_logits.float() / tau, top_ids, top_log_p.float(), None)
    return kl * tau**2


def cross_entropy_and_top_k_kd(logits: Tensor, labels: Tensor, top_ids: Tensor, top_log_p: Tensor):
    """Per token cross-entropy and top-k KD at temperature 1, sharing one softmax: together they cost about what
    ``F.cross_entropy`` alone does (PARD's loss), which keeps a step from the cache as cheap as a PARD step."""
    kl, ce = _BucketKL.apply(logits.float(), top_ids, top_log_p.float(), labels)
    return ce, kl


class _BucketKL(torch.autograd.Function):
    """``KL(q + bucket || softmax(z) + bucket)`` per row and, given labels, the cross-entropy ``-log softmax(z)_y``,
    in a few passes over ``[n, V]``: one ``exp`` buffer serves the softmax's sum, then (its top-k entries zeroed in
    place) the exact sum over the rest, then the backward. Through autograd (log_softmax, a scatter, a logsumexp
    and their backwards) the KD alone made the head's loss 1.7x as slow as cross-entropy on CPU.

    With ``p = softmax(z)``, ``c = sum q + r_T`` and the rest ``R`` (ids outside the top-k):
    ``dKL/dz_j = c p_j - q_j [j in top] - r_T p_j / p(R) [j in R]`` and ``dCE/dz_j = p_j - [j = y]``."""

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, log_q: Tensor, labels: Tensor | None):
        peak = z.max(dim=-1, keepdim=True).values
        e = (z - peak).exp_()
        total = e.sum(-1)
        log_total = total.log()
        e_top = e.gather(-1, ids)
        q = log_q.exp()
        kl = (q * (log_q - (e_top.log() - log_total[:, None]))).sum(-1)  # e_top.log() - log_total: log p at top
        ce = torch.zeros_like(total)
        if labels is not None:
            ce = log_total + peak.squeeze(-1) - z.gather(-1, labels[:, None]).squeeze(-1)
        bucket = ids.shape[-1] < z.shape[-1]  # k = vocabulary: no rest, and the KL is the full one
        rest_q = (1.0 - q.sum(-1)).clamp(min=0.0) if bucket else torch.zeros_like(total)
        rest = total
        if bucket:
            e.scatter_(-1, ids, 0.0)
            rest = e.sum(-1)  # summed over the rest itself: exact even when the top-k holds nearly everything
            log_rest_p = rest.log() - log_total
            kl = kl + torch.xlogy(rest_q, rest_q) - torch.where(rest_q > 0, rest_q * log_rest_p, 0.0)
        ctx.bucket = bucket
        ctx.save_for_backward(e, ids, q, e_top, total, rest, rest_q, labels)
        if labels is None:
            ctx.mark_non_differentiable(ce)
        return kl, ce

    @staticmethod
    def backward(ctx, grad_kl: Tensor | None, grad_ce: Tensor | None):
        e, ids, q, e_top, total, rest, rest_q, labels = ctx.saved_tensors
        grad_kl = torch.zeros_like(total) if grad_kl is None else grad_kl
        grad_ce = torch.zeros_like(total) if grad_ce is None or labels is None else grad_ce
        c = q.sum(-1) + rest_q
        # Every softmax-proportional term at once: p_j (c grad_kl + grad_ce) on all j, minus the rest's share.
        scale = (c * grad_kl + grad_ce) / total
        if ctx.bucket:  # e is zero on the top-k: the rest's gradient in one pass, the top-k's added after
            scale = scale - torch.where(rest_q > 0, rest_q / rest, 0.0) * grad_kl
            top = ((c * grad_kl + grad_ce) / total)[:, None] * e_top - q * grad_kl[:, None]
        else:  # e is whole: its pass already gave the top-k their softmax terms
            top = -q * grad_kl[:, None]
        grad = (e * scale[:, None]).scatter_add_(-1, ids, top)
        if labels is not None:
            grad.scatter_add_(-1, labels[:, None], -grad_ce[:, None])
        return grad, None, None, None


class TeacherCache:
    """A finished cache, memory-mapped: per split, the shards' tensors; per micro-batch, the signals as tensors."""

    def __init__(self, directory: Path, manifest: dict, rows: dict[str, list[PackedRow]]):
        self.directory, self.manifest, self.rows = directory, manifest, rows
        self.top_k = int(manifest["top_k"])
        self.vocabulary = int(manifest["vocabulary"])
        self.feature_width = manifest.get("feature_width")
        """``n * H`` of the target's features, when the cache holds them (its key then names their layers)."""
        self.shards: dict[str, list[tuple[int, dict]]] = {}
        for entry in manifest["shards"]:
            # mmap: only the pages of the rows a step reads come into memory; a cache larger than RAM still works.
            data = torch.load(directory / entry["name"], mmap=True, weights_only=True)
            self.shards.setdefault(entry["split"], []).append((entry["begin"], data))
        for parts in self.shards.values():
            parts.sort(key=lambda part: part[0])
        self._starts = {split: [begin for begin, _ in parts] for split, parts in self.shards.items()}

    @classmethod
    def open(cls, root: Path, rows: dict[str, list[PackedRow]], target: str, settings) -> TeacherCache:
        """The cache for these rows and settings, or a one-line ConfigError saying what differs from the caches
        that exist and how to build the right one."""
        key = cache_key(rows, target, settings)
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

    def _part(self, split: str, row: int) -> tuple[dict, list[int], list[int]]:
        """The shard holding ``row``, and the row's spans of real and of labelled tokens in it."""
        begin, data = self.shards[split][bisect.bisect_right(self._starts[split], row) - 1]
        local = row - begin
        return data, data["real_offsets"][local : local + 2].tolist(), data["label_offsets"][local : local + 2].tolist()

    def _row(self, split: str, row: int) -> tuple[Tensor, Tensor, Tensor]:
        data, real, labelled = self._part(split, row)
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

    def features(self, split: str, row_ids: list[int], length: int, device) -> Tensor:
        """``[B, length, n * H]``: the target's features at the rows' real tokens, in the stored dtype (the loss casts
        them to the draft's), zeros past a row's end; f(a) is ``features[a - 1]``, as the online teacher gives it."""
        first = self._part(split, row_ids[0])[0]["features"]
        out = torch.zeros(len(row_ids), length, first.shape[-1], dtype=first.dtype)
        for i, row in enumerate(row_ids):
            data, real, _ = self._part(split, row)
            n = min(real[1] - real[0], length)
            out[i, :n] = data["features"][real[0] : real[0] + n]
        return out.to(device)
