"""PARD-2: the PARD layout trained for the acceptance length under a frozen target (arXiv 2605.08632; README "PARD-2").

Per labelled layout token (depth d, position p, anchor a = p - d):

- CAT weight ``w = prod_{u=a+1..p} g(u)`` from the target's confidences, computed from the O(T) layout vectors as
  ``exp(C[p] - C[a])`` with C the running sum of log g along the row (a and p share a document, so the difference
  never crosses a boundary);
- loss ``sum w * (alpha_CE * CE + alpha_KD * tau^2 * KL(p_T/tau || p_S/tau)) / sum w`` over the global batch;
- dual mode: the input embedding gains ``s * W f(a) * keep``, ``f(a)`` the target's features at position ``a - 1``
  (zero at a document's first token), ``keep`` drawn per document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from pard_train.base.config import AttentionBackend, FeatureCapture, MethodConfig, TeacherSource
from pard_train.base.errors import ConfigError
from pard_train.core.layout import IGNORE_INDEX, PAD_DOCUMENT, PardBatch
from pard_train.core.lm_head_loss import chunked_head_loss, gather_head_with, project_logits
from pard_train.core.loss import DepthStats, labelled_hidden
from pard_train.methods.pard import split_objective_state
from pard_train.methods.teacher import TeacherSignals
from pard_train.methods.teacher_cache import cross_entropy_and_top_k_kd, top_k_kd
from pard_train.run.distributed import gather_all

logger = logging.getLogger(__name__)


def own_positions(batch: PardBatch) -> Tensor:
    """Row index of each layout token's own position p = anchor + depth (0 for padding)."""
    return torch.where(batch.document != PAD_DOCUMENT, batch.anchor + batch.depth, torch.zeros_like(batch.anchor))


def cat_weights(batch: PardBatch, log_confidence: Tensor) -> Tensor:
    """``[B, T]`` CAT weights: ``prod_{u=a+1..p} g(u)`` for labelled tokens, 0 for the others."""
    running = torch.cumsum(log_confidence, dim=1)  # float64: long rows of small logs stay exact enough
    anchor = batch.anchor.clamp(min=0)
    log_w = running.gather(1, own_positions(batch)) - running.gather(1, anchor)
    labelled = batch.labels != IGNORE_INDEX
    return torch.where(labelled, log_w.exp(), torch.zeros_like(log_w)).float()


def anchor_features(batch: PardBatch, projected: Tensor, keep: Tensor) -> Tensor:
    """``[B, T, H]``: the projected feature of each token's anchor, ``projected[a - 1]`` (zero when the anchor is the
    first token of its document, or for padding), times ``keep`` of the token's document."""
    anchor = batch.anchor.clamp(min=0)
    first_of_document = batch.position_ids.gather(1, anchor) == 0
    source = (anchor - 1).clamp(min=0)
    gathered = projected.gather(1, source[..., None].expand(-1, -1, projected.shape[-1]))
    use = (~first_of_document) & (batch.document != PAD_DOCUMENT)
    use = use & keep.gather(1, batch.document.clamp(min=0))
    return gathered * use[..., None].to(gathered.dtype)


def document_keep(batch: PardBatch, drop: float, generator: torch.Generator) -> Tensor:
    """``[B, D]`` bool: whether each document of each row trains with features (Bernoulli(1 - q), seeded)."""
    num_documents = int(batch.document.max()) + 1 if batch.document.numel() else 1
    draws = torch.rand(batch.document.shape[0], max(num_documents, 1), generator=generator)
    return (draws >= drop).to(batch.document.device)


@dataclass
class Pard2Inputs:
    """What one micro-batch's PARD-2 loss needs besides the draft: the layout, the teacher's signals, per-token CAT
    weights and the per-document feature switch."""

    batch: PardBatch
    signals: TeacherSignals
    weights: Tensor
    keep: Tensor | None
    teacher: torch.nn.Module
    """The target model, for its logits (:func:`pard_train.core.lm_head_loss.project_logits`)."""

    @property
    def weight_sum(self) -> float:
        return float(self.weights.sum())


@dataclass
class Pard2Stats(DepthStats):
    """PARD's per-depth sums plus the CAT weight, the weighted cross-entropy and the weighted KD term."""

    weight: Tensor  # [K] sum of CAT weights
    weighted_ce: Tensor  # [K] sum of w * CE
    weighted_kd: Tensor  # [K] sum of w * tau^2 * KL

    def __add__(self, other: Pard2Stats) -> Pard2Stats:
        return Pard2Stats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self) -> Tensor:
        return torch.stack([getattr(self, f.name) for f in fields(self)])

    @classmethod
    def from_tensor(cls, stacked: Tensor) -> Pard2Stats:
        return cls(*stacked)

    @classmethod
    def zeros(cls, num_depths: int, device) -> Pard2Stats:
        return cls(*(torch.zeros(num_depths, device=device) for _ in fields(cls)))

    def summary(self) -> dict[str, float]:
        out = super().summary()
        weight = self.weight.clamp(min=1e-12)
        out["loss_weighted"] = float(self.weighted_ce.sum() / weight.sum())
        out["kd"] = float(self.weighted_kd.sum() / weight.sum())
        for depth in range(len(weight)):
            out[f"cat_weight/depth_{depth}"] = float(self.weight[depth] / self.count[depth].clamp(min=1))
            out[f"loss_weighted/depth_{depth}"] = float(self.weighted_ce[depth] / weight[depth])
            out[f"kd/depth_{depth}"] = float(self.weighted_kd[depth] / weight[depth])
        return out


def _kd(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Per token ``tau^2 * KL(p_T/tau || p_S/tau)``; the teacher's side carries no gradient."""
    with torch.no_grad():
        teacher_log_p = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    student_log_p = F.log_softmax(student_logits / tau, dim=-1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1) * tau**2


def pard2_loss(
    draft,
    projection: torch.nn.Module | None,
    inputs: Pard2Inputs,
    backend: AttentionBackend,
    num_depths: int,
    settings: MethodConfig,
    normalizer: float,
) -> tuple[Tensor, Pard2Stats]:
    """``sum_w (alpha_CE CE + alpha_KD KD) / normalizer`` (the global sum of CAT weights) and per-depth sums."""
    batch, signals = inputs.batch, inputs.signals
    embeds = None
    if projection is not None and signals.features is not None:
        embeds = draft.get_input_embeddings()(batch.input_ids)
        projected = projection(signals.features.to(embeds.dtype))
        embeds = embeds + settings.feature_scale * anchor_features(batch, projected, inputs.keep)
    hidden, labels, depth = labelled_hidden(draft, batch, backend, inputs_embeds=embeds)
    selected = batch.labels != IGNORE_INDEX
    weight = inputs.weights[selected]
    rows = selected.nonzero(as_tuple=True)[0]
    # Without distillation the teacher's states are not read (tau is None below): the student's stand in.
    teacher_hidden = signals.hidden[rows, own_positions(batch)[selected]] if signals.hidden is not None else hidden
    cached = signals.top_ids is not None  # the teacher cache: sparse top-k instead of the target's logits
    if cached:
        top_ids = signals.top_ids[rows, own_positions(batch)[selected]]
        top_log_p = signals.top_log_p[rows, own_positions(batch)[selected]]

    tau = settings.kd_temperature if settings.kd_weight > 0 else None

    def weighted_terms(logits: Tensor, part: slice) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Per token w * (alpha_CE CE + alpha_KD KD), and CE, KD and the top-1 hit for the statistics. Without
        distillation (tau None) no teacher logits are computed."""
        logits = logits.float()
        if cached and tau == 1.0:  # one shared softmax for both terms: the step costs what a PARD step does
            ce, kd = cross_entropy_and_top_k_kd(logits, labels[part], top_ids[part], top_log_p[part])
        else:
            ce = F.cross_entropy(logits, labels[part], reduction="none")
            kd = torch.zeros_like(ce) if tau is None else None
        if kd is None and cached:
            kd = top_k_kd(logits, top_ids[part], top_log_p[part], tau)
        elif kd is None:
            with torch.no_grad():
                teacher_logits = project_logits(inputs.teacher, teacher_hidden[part])
            kd = _kd(logits, teacher_logits, tau)
        objective = weight[part] * (settings.ce_weight * ce + settings.kd_weight * kd)
        hit = (logits.detach().argmax(-1) == labels[part]).float()
        return objective, (ce.detach(), kd.detach(), hit)

    # The head runs once per chunk: only one chunk's [tokens, vocabulary] logits (student and teacher) exist at once.
    total, (ce, kd, hit) = chunked_head_loss(draft, hidden, weighted_terms, normalizer)
    with torch.no_grad():
        sums = [ce, hit, torch.ones_like(ce), weight, weight * ce, weight * kd]
        stats = Pard2Stats(*(torch.zeros(num_depths, device=ce.device).index_add_(0, depth, v) for v in sums))
    return total, stats


RESUME_KEYS = ("target", "ce_weight", "kd_weight", "kd_temperature", "cat", "features", "feature_scale", "feature_drop")


def resume_settings(settings: MethodConfig) -> dict:
    """PARD-2's settings that change what is learned, as a checkpoint records them."""
    recorded = {f"method.{key}": getattr(settings, key) for key in RESUME_KEYS}
    recorded["method.feature_layers"] = list(settings.feature_layers)
    if settings.features:  # without features no target state is read: the capture changes nothing
        recorded["method.feature_capture"] = FeatureCapture(settings.feature_capture).value
    # The cache's top-k KD is not the online teacher's full-vocabulary KD: switching mid-run changes the objective.
    recorded["method.teacher"] = TeacherSource(settings.teacher).value
    if settings.teacher == TeacherSource.cache:
        recorded["method.top_k"] = settings.top_k
        recorded["method.top_k_dtype"] = settings.top_k_dtype
    return recorded


def recorded_defaults(recorded: dict) -> dict:
    """What older PARD-2 checkpoints trained with: the online teacher (before the cache) and, with features, HF
    hidden_states (before ``method.feature_capture``)."""
    defaults = {}
    if recorded.get("method.name") == "pard2":  # from before the teacher cache: the online teacher
        defaults["method.teacher"] = TeacherSource.online.value
        if recorded.get("method.features"):
            defaults["method.feature_capture"] = FeatureCapture.training.value
    return defaults


def _zero3_config(accelerator) -> dict | None:
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.deepspeed_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    return plugin.deepspeed_config


def _sharded_for_inference(target, accelerator):
    """The frozen target, partitioned across ranks by ZeRO-3 and run by an inference engine (no optimizer, no
    gradients): each rank keeps 1/world of its weights (small tensors such as norms stay whole), and every forward
    gathers one layer's at a time. Every rank must run the same number of target forwards: the trainer and the
    held-out evaluator do (filler batches), and the confidence cache is computed by every rank."""
    import deepspeed

    training = _zero3_config(accelerator)
    hidden = target.config.get_text_config().hidden_size
    zero = {
        "stage": 3,
        "stage3_param_persistence_threshold": 10 * hidden,
        # No prefetch: the decoder and, in the loss chunks, the LM head are called on their own, so the module order
        # DeepSpeed would trace changes from step to step.
        "stage3_prefetch_bucket_size": 0,
    }
    if "offload_param" in training["zero_optimization"]:
        zero["offload_param"] = training["zero_optimization"]["offload_param"]
    config = {
        "train_micro_batch_size_per_gpu": training["train_micro_batch_size_per_gpu"],
        "zero_optimization": zero,
        "bf16": {"enabled": bool(training.get("bf16", {}).get("enabled"))},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=target, config=config)
    engine.eval()
    # Small persistent tensors are held whole besides each rank's partition of the others.
    held = sum(p.ds_numel if p.ds_persist else p.ds_tensor.numel() for p in engine.module.parameters())
    total = sum(p.ds_numel for p in engine.module.parameters())
    # One line for all ranks, from rank 0 (every rank builds the engine: the gather is a collective they all reach).
    parts = ", ".join(str(part) for part in gather_all(accelerator, held))
    logger.info(f"PARD-2 target sharded by ZeRO-3: the ranks hold {parts} of {total} parameters")
    return engine


class Pard2Objective(torch.nn.Module):
    """The draft and the feature projection W (bias-free, ``n * H_target -> H_draft``) as one module, so that DDP,
    DeepSpeed (ZeRO-3 included), checkpoints and resume cover W like any draft weight."""

    def __init__(self, draft, projection, backend: AttentionBackend, num_depths: int, settings: MethodConfig):
        super().__init__()
        self.draft, self.projection = draft, projection
        self.backend, self.num_depths, self.settings = backend, num_depths, settings
        gather_head_with(self, draft)  # ZeRO-3: the loss reads the head's weight directly

    def forward(self, inputs: Pard2Inputs, normalizer: float) -> tuple[Tensor, Pard2Stats]:
        return pard2_loss(self.draft, self.projection, inputs, self.backend, self.num_depths, self.settings, normalizer)


def _open_teacher_cache(settings: MethodConfig, cache_dir: str | None, draft, data):
    """The finished teacher cache of these rows and settings under ``cache_dir`` (``data.cache_dir``), else one line
    saying what to build."""
    from pathlib import Path

    from pard_train.data.documents import default_cache_dir
    from pard_train.methods.teacher_cache import TeacherCache
    from pard_train.modelio.model import embedding_rows

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    rows = {"train": data.train, "validation": data.validation}
    cache = TeacherCache.open(root, rows, settings.target, settings)
    if cache.vocabulary != embedding_rows(draft):
        raise ConfigError(
            f"method.teacher=cache: the cache's target has {cache.vocabulary} vocabulary rows, the draft "
            f"{embedding_rows(draft)}; PARD-2 distils over one shared vocabulary"
        )
    return cache


class Pard2Method:
    """Loads the target once (frozen, bf16 on GPUs; sharded across ranks under ZeRO-3), checks it shares the draft's
    vocabulary, and builds W. With ``method.teacher=cache`` it opens the teacher cache instead, and loads the target
    only when features need it."""

    def __init__(
        self,
        settings: MethodConfig,
        draft,
        backend: AttentionBackend,
        spec,
        accelerator,
        data=None,
        *,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        from pard_train.methods.teacher import Teacher
        from pard_train.modelio.model import embedding_rows, load_causal_lm

        self.settings = settings
        dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
        self.target_engine = self.cache = None
        if settings.teacher == "cache":
            self.cache = _open_teacher_cache(settings, cache_dir, draft, data)
        if self.cache is not None and not settings.features:
            target = None  # the cache holds every signal the step needs: no target at all
        elif _zero3_config(accelerator) is not None:
            # transformers partitions while loading (ZeRO-3 is registered); an inference engine gathers each layer's
            # weights for its forward, so no rank ever holds the whole target.
            self.target_engine = _sharded_for_inference(
                load_causal_lm(settings.target, backend, dtype=dtype), accelerator
            )
            target = self.target_engine.module
        else:
            target = load_causal_lm(settings.target, backend, dtype=dtype).to(accelerator.device)
        if target is not None and embedding_rows(target) != embedding_rows(draft):
            raise ConfigError(
                f"method.target: {settings.target} has {embedding_rows(target)} embedding rows, the draft "
                f"{embedding_rows(draft)}; PARD-2 distils over one shared vocabulary: pick a target of its family"
            )
        layers = list(settings.feature_layers) if settings.features else None
        if layers is not None:
            depth = target.config.get_text_config().num_hidden_layers + 1  # hidden_states: embeddings + each layer
            bad = [layer for layer in layers if not -depth <= layer < depth]
            if bad:
                raise ConfigError(f"method.feature_layers: {bad} outside the target's {depth} hidden states")
        self.teacher = Teacher(target, backend, layers, settings.feature_capture) if target is not None else None
        projection = None
        if layers is not None:
            draft_width = draft.config.get_text_config().hidden_size
            projection = torch.nn.Linear(len(layers) * self.teacher.hidden_size, draft_width, bias=False)
            # Zero, not nn.Linear's default (the reference's): the untrained TD draft is then exactly the PARD draft it
            # started as, and no random W f(a) perturbs the inputs while the draft learns. Measured on the derived
            # SmolLM2 pair (docs/benchmarks.md, "W initialised to zero"): TI AL 1.059 vs 1.017, TD 1.066 vs 1.042.
            torch.nn.init.zeros_(projection.weight)
        self.objective = Pard2Objective(draft, projection, backend, spec.num_draft_tokens, settings)
        self.seed, self.process_index = seed, accelerator.process_index
        self.num_depths = spec.num_draft_tokens
        self.confidences = None
        if settings.confidence_cache:
            from pard_train.data.documents import default_cache_dir
            from pard_train.methods import confidence_cache

            directory = cache_dir if cache_dir else default_cache_dir()
            rows = {"train": data.train, "validation": data.validation}
            self.confidences, _ = confidence_cache.build_or_load(
                self.teacher, rows, settings.target, directory, accelerator, sharded=self.target_engine is not None
            )
            self.teacher = self.target_engine = None  # the step no longer needs the target: give its memory back
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()

    def prepare(
        self, batch: PardBatch, step: int, micro_index: int, row_ids, split="train"
    ) -> tuple[Pard2Inputs, float]:
        if self.confidences is not None:  # CAT alone, from the offline cache: no target forward
            length = int(((batch.depth == 0) & (batch.document >= 0)).sum(1).max())
            log_g = self.confidences.log_confidence(split, row_ids, length, batch.depth.device)
            weights = cat_weights(batch, log_g)
            return Pard2Inputs(batch, TeacherSignals(log_g, None, None), weights, None, None), float(weights.sum())
        signals = self._cached_signals(batch, row_ids, split) if self.cache is not None else self.teacher(batch)
        labelled = (batch.labels != IGNORE_INDEX).float()
        weights = cat_weights(batch, signals.log_confidence) if self.settings.cat else labelled
        keep = None
        if self.settings.features:
            # Seeded by (seed, step, process, micro-batch): the same draws after a resume.
            seed = hash((self.seed, step, self.process_index, micro_index)) & 0x7FFF_FFFF_FFFF_FFFF
            keep = document_keep(batch, self.settings.feature_drop, torch.Generator().manual_seed(seed))
        inputs = Pard2Inputs(batch, signals, weights, keep, self.teacher.model if self.teacher else None)
        return inputs, inputs.weight_sum

    def _cached_signals(self, batch: PardBatch, row_ids, split: str) -> TeacherSignals:
        """Confidences and top-k from the cache; with features the target runs for them alone."""
        length = int(((batch.depth == 0) & (batch.document >= 0)).sum(1).max())
        log_g, top_ids, top_log_p = self.cache.signals(split, row_ids, length, batch.depth.device)
        features = self.teacher.features(batch) if self.settings.features else None
        return TeacherSignals(log_g, None, features, top_ids, top_log_p)

    def zero_stats(self, num_depths: int, device) -> Pard2Stats:
        return Pard2Stats.zeros(num_depths, device)

    def resume_settings(self) -> dict:
        return resume_settings(self.settings)

    def recorded_defaults(self, recorded: dict) -> dict:
        return recorded_defaults(recorded)

    @property
    def draft(self) -> torch.nn.Module:
        return self.objective.draft

    def export_state(self, objective_state: dict[str, Tensor]):
        """The draft's weights, and the PARD-2 fields and W of a target-dependent draft; None instead of those when
        trained without features (CAT/KD only), which makes a plain PARD draft that no server mistakes for a
        target-dependent one."""
        from pard_train.modelio.draft_format import Pard2Fields

        draft, extras = split_objective_state(objective_state)
        settings = self.settings
        if not settings.features:
            return draft, None
        weight = extras["projection.weight"]
        fields_ = Pard2Fields(
            target_layers=tuple(settings.feature_layers),
            target_dim=int(weight.shape[1]),
            scale=settings.feature_scale,
            proj_bias=False,
            target=settings.target,
            feature_capture=settings.feature_capture,
        )
        return draft, (fields_, weight)
