"""The frozen target as a teacher: one forward over the real tokens of a layout batch gives, per real token, the
target's confidence ``g(u) = p_T(x_u | x_<u)``, its final hidden state (for distillation logits, computed later in
chunks) and, for dual mode, the concatenated hidden states at the feature layers.

The real tokens of a layout row are its first L entries (depth 0 keeps every token, and rows are ordered by depth), so
real row index ``i`` is layout index ``i``, and a layout token's own position is ``anchor + depth``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from pard_train.base.config import AttentionBackend, FeatureCapture
from pard_train.core.attention import BLOCK, attention_mask_for
from pard_train.core.layout import IGNORE_INDEX, PAD_DOCUMENT, PardBatch
from pard_train.core.lm_head_loss import chunked_head_loss
from pard_train.evaluate.feature_capture import aux_ids, final_norm_input, target_features


@dataclass
class TeacherSignals:
    log_confidence: Tensor
    """``[B, L]`` float64: log g(u) for real tokens with a predecessor in their document, 0 elsewhere."""
    hidden: Tensor | None
    """``[B, L, H_t]`` the target's final hidden state (after its final norm) at every real position; None when the
    confidences come from the offline cache (no distillation then)."""
    features: Tensor | None
    """``[B, L, n * H_t]`` hidden states at the feature layers (as ``method.feature_capture`` says), concatenated;
    f(a) is ``features[a - 1]``."""
    top_ids: Tensor | None = None
    """``[B, L, k]`` long, teacher cache only: the target's top-k token ids at every labelled real position (what
    ``hidden`` would give, kept sparse; :mod:`pard_train.methods.teacher_cache`)."""
    top_log_p: Tensor | None = None
    """``[B, L, k]`` float32: their log-probabilities at the KD temperature."""


def real_tokens(batch: PardBatch, multiple: int = 1) -> PardBatch:
    """The depth-0 prefix of every row as a batch of its own: ``[B, L]`` with L the longest real row (rounded up to
    ``multiple``); what follows a shorter row's real tokens (its masks, or padding) becomes padding."""
    real = (batch.depth == 0) & (batch.document != PAD_DOCUMENT)
    length = int(real.sum(dim=1).max())
    length = min(-(-length // multiple) * multiple, batch.depth.shape[1])
    keep = real[:, :length]
    pad = torch.full_like(batch.input_ids[:, :length], PAD_DOCUMENT)
    return PardBatch(
        input_ids=torch.where(keep, batch.input_ids[:, :length], torch.zeros_like(pad)),
        position_ids=torch.where(keep, batch.position_ids[:, :length], torch.zeros_like(pad)),
        depth=torch.zeros_like(pad),
        anchor=torch.where(keep, torch.arange(length, device=pad.device).expand_as(pad), pad),
        document=torch.where(keep, batch.document[:, :length], pad),
        labels=torch.full_like(pad, IGNORE_INDEX),
    )


class Teacher:
    """A frozen causal LM (the target) and what PARD-2 reads from it; refuses feature layers outside its hidden
    states (the online teacher and the teacher cache's builder both stand on this)."""

    def __init__(
        self,
        model,
        backend: AttentionBackend,
        feature_layers: list[int] | None,
        capture: FeatureCapture = FeatureCapture.training,
    ):
        self.model, self.backend, self.feature_layers, self.capture = model.eval(), backend, feature_layers, capture
        if feature_layers is not None:
            aux_ids(feature_layers, model.config.get_text_config().num_hidden_layers)
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @torch.no_grad()
    def __call__(self, batch: PardBatch) -> TeacherSignals:
        real = self._real(batch)
        hidden, features = self.states(real)
        return TeacherSignals(self._log_confidence(real, hidden), hidden, features)

    def _real(self, batch: PardBatch) -> PardBatch:
        # FlexAttention compiles per shape: lengths in multiples of its block size keep the number of shapes small.
        return real_tokens(batch, BLOCK if self.backend == AttentionBackend.flex else 1)

    @torch.no_grad()
    def states(self, real: PardBatch) -> tuple[Tensor, Tensor | None]:
        """One forward over a batch of real tokens (:func:`real_tokens`): the final hidden state and the features,
        captured as ``self.capture`` says: the same :func:`~pard_train.evaluate.feature_capture.target_features` the
        harness's verification loop calls, so a draft is trained and measured on the same states (and the teacher
        cache's builder calls this too, so a cached feature is the online teacher's)."""
        capture = self.capture if self.feature_layers is not None else FeatureCapture.training
        # vllm: the final norm's input is layer -1 as vLLM captures it (HF hidden_states only hold its output).
        hook = final_norm_input(self.model) if capture == FeatureCapture.vllm else nullcontext({})
        with hook as captured:
            out = self.model.get_decoder()(
                input_ids=real.input_ids,
                position_ids=real.position_ids,
                attention_mask=attention_mask_for(real, self.backend),
                output_hidden_states=self.feature_layers is not None,
                use_cache=False,
            )
        if self.feature_layers is None:
            return out.last_hidden_state, None
        features = target_features(out.hidden_states, self.feature_layers, capture, captured.get("pre_norm"))
        return out.last_hidden_state, features

    def _log_confidence(self, real: PardBatch, hidden: Tensor) -> Tensor:
        """log p_T(x_u | x_<u) from the logits at u - 1, for u with a predecessor in its document (chunked)."""
        scored = torch.zeros_like(real.input_ids, dtype=torch.bool)
        scored[:, 1:] = (real.document[:, 1:] != PAD_DOCUMENT) & (real.document[:, 1:] == real.document[:, :-1])
        rows, positions = scored.nonzero(as_tuple=True)
        targets = real.input_ids[rows, positions]

        def log_probability(logits: Tensor, part: slice) -> tuple[Tensor, tuple[Tensor]]:
            logits = logits.float()
            chosen = logits.gather(-1, targets[part, None]).squeeze(-1)
            return torch.zeros_like(chosen), ((chosen - torch.logsumexp(logits, dim=-1)).double(),)

        # Chunked like the loss: only one chunk's full-vocabulary target logits exist at once.
        _, (scores,) = chunked_head_loss(self.model, hidden[rows, positions - 1], log_probability)
        log_g = torch.zeros(real.input_ids.shape, dtype=torch.float64, device=hidden.device)
        log_g[rows, positions] = scores
        return log_g
