"""PARD-2's target-dependent (TD) mode in the harness: the PARD drafter whose inputs also carry the target's hidden
states, aligned exactly as in training (``pard_train.methods.pard2_loss``): a real token at position j gets
``f(j) = h_T(j - 1)`` (zero at position 0), each mask gets ``f(n)`` of the newest real token n, i.e. ``h_T(n - 1)``,
the newest target state when drafting. Features enter as ``Emb(id) + s * W f``.

The verification loop hands the drafter the target's features after the prefill and after each verification
(``observe_target``); positions of rejected drafts are overwritten by the next round before they are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pard_train.base.errors import ConfigError
from pard_train.evaluate.feature_capture import FeatureCapture
from pard_train.evaluate.speculative import PardDrafter
from pard_train.modelio import draft_format


class Pard2Drafter(PardDrafter):
    def __init__(
        self,
        model,
        mask_token_id: int,
        projection: torch.nn.Module,
        scale: float,
        layers: Sequence[int],
        feature_capture: FeatureCapture = FeatureCapture.training,
    ):
        super().__init__(model, mask_token_id)
        self.projection, self.scale, self.target_layers = projection, scale, list(layers)
        self.feature_capture = feature_capture
        """Which target states the verification loop hands over (:mod:`pard_train.evaluate.feature_capture`)."""
        self.features: Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.features = None

    def observe_target(self, features: Tensor, start: int) -> None:
        end = start + features.shape[0]
        if self.features is None:
            self.features = features.new_zeros(0, features.shape[1])
        if self.features.shape[0] < end:
            grown = self.features.new_zeros(end, features.shape[1])
            grown[: self.features.shape[0]] = self.features
            self.features = grown
        self.features[start:end] = features

    def _feature(self, position: int) -> Tensor:
        """f(position) = h_T(position - 1); zero for the first token."""
        if position == 0:
            return self.features.new_zeros(self.features.shape[1])
        return self.features[position - 1]

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        start, newest = self.lm.cached, len(tokens) - 1
        positions = [*range(start, len(tokens)), *[newest] * (k - 1)]  # masks carry the newest real token's feature
        features = torch.stack([self._feature(p) for p in positions])
        embedding = self.lm.model.get_input_embeddings()

        def embed(ids):
            projected = self.projection(features.to(self.projection.weight.dtype))
            return embedding(ids) + self.scale * projected[None].to(embedding.weight.dtype)

        logits = self.lm.forward([*tokens[start:], *[self.mask_token_id] * (k - 1)], start, k, embed=embed)
        self.lm.crop(len(tokens))
        self.last_logits = logits
        return [int(token) for token in logits.argmax(-1)]


def load_pard2_drafter(
    draft, draft_dir: str, mask_token_id: int, target_width: int, capture: FeatureCapture | None = None
) -> Pard2Drafter:
    """The TD drafter of an exported PARD-2 draft: W, the scale, layers and feature capture from its directory
    (:func:`pard_train.modelio.draft_format.read`); ``capture`` overrides the capture the draft was trained on. Refuses
    a
    target whose feature width differs from W's (vLLM falls back to TI there; a measurement should not)."""
    pard2 = draft_format.read(draft_dir).pard2
    if pard2 is None:
        raise ConfigError(f"modes: pard2 needs a target-dependent PARD-2 draft; {draft_dir} is a plain PARD draft")
    layers = list(pard2.target_layers)
    if target_width * len(layers) != pard2.target_dim:
        raise ConfigError(
            f"target: its hidden size {target_width} x {len(layers)} layers != the feature width "
            f"{pard2.target_dim} of {draft_dir}: the draft was trained with another target"
        )
    weight = draft_format.load_projection(draft_dir)
    device = next(draft.parameters()).device
    projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(device, weight.dtype)
    with torch.no_grad():
        projection.weight.copy_(weight.to(device))
    capture = pard2.feature_capture if capture is None else capture
    return Pard2Drafter(draft, mask_token_id, projection, pard2.scale, layers, capture)
