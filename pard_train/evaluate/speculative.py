"""Speculative decoding with greedy verification: plain target decoding, an AR draft, or a PARD parallel draft.

One loop serves all three modes. Invariant between rounds: ``tokens`` is the prompt plus everything generated; the
target's KV cache holds every token but the last one, which is *pending* (fed at the start of the next verification).
A round: the drafter proposes ``k`` tokens ``y_1..y_k``; the target runs once on ``[pending, y_1..y_k]`` and its argmax
``g_0..g_k`` decides: the longest prefix with ``y_i == g_{i-1}`` is accepted, then the bonus ``g_j``. The output is
therefore exactly the target's greedy output, whatever the draft proposes (lossless), and ``target`` mode is the same
loop with no draft at all (one token per target forward).

Drafters (what a server does):

- :class:`ArDrafter`: K sequential forwards of a small causal LM (vanilla speculative decoding); its cache keeps the
  accepted drafted tokens.
- :class:`PardDrafter`: one forward of ``[accepted tokens not yet in the draft cache] + [mask] * (K-1)`` at consecutive
  positions; the logits of the last real token and of the K-1 masks give ``y_1..y_K``. The masks' KV entries are
  cropped away afterwards, so the draft cache only ever holds real tokens — the layout PARD training builds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pard_train.evaluate.feature_capture import FeatureCapture, final_norm_input, target_features


def crop_cache(cache, keep: int) -> None:
    """Truncate a transformers KV cache to its first ``keep`` positions."""
    current = cache.get_seq_length()
    if current > keep:
        # A negative argument removes that many tokens from the end, in every transformers 5 release (the positive
        # form changed meaning from "keep this many" to an error).
        cache.crop(keep - current)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Wall-clock seconds spent in a model, synchronised with the device so asynchronous kernels are counted."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


class Drafter:
    """Proposes draft tokens for a sequence. Subclasses keep their own KV cache between rounds of one generation."""

    forwards: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        """Forget the previous generation (called before each prompt)."""
        self.forwards, self.seconds = 0, 0.0

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Return ``k`` draft tokens continuing ``tokens`` (the whole sequence so far)."""
        raise NotImplementedError

    def accept(self, tokens: Sequence[int]) -> None:
        """Told the sequence after verification, so the drafter can drop cache entries that were rejected."""

    target_layers: Sequence[int] | None = None
    """Target layers whose hidden states this drafter reads (PARD-2's target-dependent mode); None: none."""

    def observe_target(self, features: Tensor, start: int) -> None:
        """Given the target's features ``[n, F]`` of positions ``start..start+n-1`` after each target forward."""


class _CachedLM:
    """A causal LM with a DynamicCache that holds a prefix of the sequence; feeds only what the cache lacks."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = None
        self.timer = _Timer(self.device)
        self.forwards = 0

    @property
    def cached(self) -> int:
        return 0 if self.cache is None else self.cache.get_seq_length()

    def forward(
        self,
        input_ids: Sequence[int],
        start: int,
        logits_to_keep: int,
        embed=None,
        hidden_layers: Sequence[int] | None = None,
        capture: FeatureCapture = FeatureCapture.training,
    ) -> Tensor:
        """Run on ``input_ids`` at positions ``start, start+1, ...`` (``start`` must equal the cache length).

        ``embed(ids) -> [1, n, H]`` replaces the input embedding (PARD-2 adds target features); with
        ``hidden_layers`` the hidden states at those layers are concatenated into ``last_features`` (``[n, F]``)."""
        if start != self.cached:
            raise RuntimeError(f"internal: feeding position {start} but the cache holds {self.cached} tokens")
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + ids.shape[1], device=self.device)[None]
        vllm = hidden_layers is not None and capture == FeatureCapture.vllm
        with self.timer, torch.no_grad(), final_norm_input(self.model) if vllm else nullcontext({}) as captured:
            out = self.model(
                input_ids=None if embed else ids,
                inputs_embeds=embed(ids) if embed else None,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                output_hidden_states=hidden_layers is not None,
            )
        if hidden_layers is not None:
            features = target_features(out.hidden_states, hidden_layers, capture, captured.get("pre_norm"))
            self.last_features = features[0]
        self.cache = out.past_key_values
        self.forwards += 1
        return out.logits[0, -logits_to_keep:].float()

    def crop(self, keep: int) -> None:
        if self.cache is not None:
            crop_cache(self.cache, keep)


class _ModelDrafter(Drafter):
    """A drafter backed by one cached causal LM (``self.lm``): its forward count and time are the LM's."""

    lm: _CachedLM

    def reset(self) -> None:
        self.lm.cache, self.lm.forwards, self.lm.timer.seconds = None, 0, 0.0

    @property
    def forwards(self) -> int:
        return self.lm.forwards

    @property
    def seconds(self) -> float:
        return self.lm.timer.seconds


class ArDrafter(_ModelDrafter):
    """Vanilla speculative decoding: k sequential greedy steps of a small causal LM."""

    def __init__(self, model):
        self.lm = _CachedLM(model)
        self.reset()

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        start = self.lm.cached
        logits = self.lm.forward(tokens[start:], start, 1)
        drafted = [int(logits[-1].argmax())]
        for _ in range(k - 1):
            logits = self.lm.forward(drafted[-1:], len(tokens) + len(drafted) - 1, 1)
            drafted.append(int(logits[-1].argmax()))
        self._proposal = (len(tokens), drafted)
        return drafted

    def accept(self, tokens: Sequence[int]) -> None:
        # The cache holds tokens[:n] + y_1..y_{k-1}; keep the part that agrees with the verified sequence.
        n, drafted = self._proposal
        keep = n
        for offset, token in enumerate(drafted[:-1]):
            if n + offset >= len(tokens) or tokens[n + offset] != token:
                break
            keep += 1
        self.lm.crop(min(keep, self.lm.cached))


class PardDrafter(_ModelDrafter):
    """A PARD draft: one forward of ``[new real tokens] + [mask] * (k-1)`` drafts k tokens; mask KV is discarded."""

    def __init__(self, model, mask_token_id: int):
        self.lm = _CachedLM(model)
        self.mask_token_id = mask_token_id
        self.last_logits: Tensor | None = None
        """``[k, V]`` logits of the latest proposal (depth 0..k-1), kept for inspection and tests."""
        self.reset()

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        start = self.lm.cached
        logits = self.lm.forward([*tokens[start:], *[self.mask_token_id] * (k - 1)], start, k)
        # The masks' KV entries are scratch: the next round sees real tokens only, as PARD training does.
        self.lm.crop(len(tokens))
        self.last_logits = logits
        return [int(token) for token in logits.argmax(-1)]


@dataclass
class Round:
    """One verification round: how many tokens were drafted, accepted by the target, and appended to the output."""

    drafted: int
    accepted: int
    emitted: int


@dataclass
class Generation:
    """The result of one prompt (one turn): generated ids and the per-round record."""

    tokens: list[int]
    rounds: list[Round] = field(default_factory=list)
    prefill_forwards: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    target_seconds: float = 0.0
    draft_seconds: float = 0.0
    wall_seconds: float = 0.0
    prefill_seconds: float = 0.0
    """Part of ``target_seconds`` spent on the prompt's forward (the rest is decoding or verification)."""
    prompt_tokens: int = 0
    stopped: bool = False
    """True if an end-of-turn/EOS token ended the generation (False: max_new_tokens)."""


def speculative_generate(
    target,
    prompt_ids: Sequence[int],
    *,
    drafter: Drafter | None,
    num_draft_tokens: int,
    max_new_tokens: int,
    stop_token_ids: Sequence[int] = (),
) -> Generation:
    """Greedy decoding of ``target`` accelerated by ``drafter`` (None: plain decoding, one token per forward).

    Returns the generated ids (the end-of-turn token included when it ends the generation), identical to
    ``target.generate(do_sample=False, max_new_tokens=..., eos_token_id=stop_token_ids)``.
    """
    if not prompt_ids:
        raise ValueError("empty prompt: the target needs at least one token to continue")
    stops = set(int(t) for t in stop_token_ids)
    verifier = _CachedLM(target)
    if drafter is not None:
        drafter.reset()
    synchronize(verifier.device)
    started = time.perf_counter()

    layers = None if drafter is None else drafter.target_layers
    capture = getattr(drafter, "feature_capture", FeatureCapture.training)
    tokens = list(prompt_ids)
    prefill = verifier.forward(tokens, 0, 1, hidden_layers=layers, capture=capture)
    if layers is not None:
        drafter.observe_target(verifier.last_features, 0)
    prefill_seconds = verifier.timer.seconds
    generated = [int(prefill[-1].argmax())]
    rounds: list[Round] = []
    # The first token comes from the prefill; the pending token is the newest one, not yet in the target cache.
    while generated[-1] not in stops and len(generated) < max_new_tokens:
        sequence = tokens + generated
        remaining = max_new_tokens - len(generated)
        k = 0 if drafter is None else min(num_draft_tokens, remaining - 1)
        drafted = drafter.propose(sequence, k) if k > 0 else []
        logits = verifier.forward(
            [sequence[-1], *drafted], len(sequence) - 1, len(drafted) + 1, hidden_layers=layers, capture=capture
        )
        if layers is not None:  # rejected positions are overwritten by the next round's verification
            drafter.observe_target(verifier.last_features, len(sequence) - 1)
        greedy = logits.argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafted) and drafted[accepted] == greedy[accepted]:
            accepted += 1
        new = [*drafted[:accepted], greedy[accepted]]
        emitted = 0
        for token in new[:remaining]:
            generated.append(token)
            emitted += 1
            if token in stops:
                break
        rounds.append(Round(drafted=len(drafted), accepted=accepted, emitted=emitted))
        # The target cache keeps the pending token and the accepted drafts; the bonus becomes the new pending token.
        verifier.crop(len(sequence) + accepted)
        if drafter is not None and k > 0:
            drafter.accept(tokens + generated)

    synchronize(verifier.device)
    return Generation(
        tokens=generated,
        rounds=rounds,
        prefill_forwards=1,
        target_forwards=verifier.forwards,
        draft_forwards=0 if drafter is None else drafter.forwards,
        target_seconds=verifier.timer.seconds,
        prefill_seconds=prefill_seconds,
        draft_seconds=0.0 if drafter is None else drafter.seconds,
        wall_seconds=time.perf_counter() - started,
        prompt_tokens=len(tokens),
        stopped=generated[-1] in stops,
    )
