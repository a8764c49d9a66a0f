"""PARD-2 as a training method (arXiv 2605.08632; docs/pard2.md): the PARD layout trained for the acceptance length
under a frozen target. :class:`Pard2Method` holds the target (or its teacher cache) and the feature projection W,
prepares each micro-batch's teacher signals, CAT weights and feature switches, and says what a checkpoint records and
what the export writes. The loss itself is :mod:`pard_train.methods.pard2_loss`; loading the target is
:mod:`pard_train.methods.pard2_target`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pard_train.base.config import AttentionBackend, FeatureCapture, MethodConfig, TeacherSource
from pard_train.core.layout import IGNORE_INDEX, PardBatch
from pard_train.methods.pard import split_objective_state
from pard_train.methods.pard2_loss import Pard2Inputs, Pard2Objective, Pard2Stats, cat_weights, document_keep
from pard_train.methods.pard2_target import load_target, open_teacher_cache
from pard_train.methods.teacher import Teacher, TeacherSignals

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


class Pard2Method:
    """Loads the target once (frozen, bf16 on GPUs; sharded across ranks under ZeRO-3), checks it shares the draft's
    vocabulary, and builds W. With ``method.teacher=cache`` it opens the teacher cache instead, which holds the
    features too when ``method.features`` is on: the target is never loaded."""

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
        self.settings = settings
        self.target_engine = self.cache = None
        if settings.teacher == "cache":
            self.cache = open_teacher_cache(settings, cache_dir, draft, data)
        target = None  # with the cache every signal the step needs, features included, is in it: no target at all
        if self.cache is None:
            target, self.target_engine = load_target(settings, draft, backend, accelerator)
        layers = list(settings.feature_layers) if settings.features else None
        self.teacher = Teacher(target, backend, layers, settings.feature_capture) if target is not None else None
        projection = None
        if layers is not None:
            draft_width = draft.config.get_text_config().hidden_size
            width = self.cache.feature_width if self.cache is not None else len(layers) * self.teacher.hidden_size
            projection = torch.nn.Linear(width, draft_width, bias=False)
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
        """Confidences, top-k and, in dual mode, the features, all from the cache."""
        length = int(((batch.depth == 0) & (batch.document >= 0)).sum(1).max())
        device = batch.depth.device
        log_g, top_ids, top_log_p = self.cache.signals(split, row_ids, length, device)
        features = self.cache.features(split, row_ids, length, device) if self.settings.features else None
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
