"""What evaluations share: models loaded once, and target-mode results that do not depend on the draft or K.

A sweep holds one :class:`EvalSession` across its cells (the same target and draft in many cells; target-only
decoding once per target and decoding settings), and releases a target before the next one loads. A single
evaluation gets a fresh session: nothing is shared, nothing is passed back through arguments.
"""

from __future__ import annotations

from pard_train.core.attention import AttentionBackend
from pard_train.evaluate.config import EvalConfig


class EvalSession:
    def __init__(self):
        self._models: dict[tuple, object] = {}
        self._target_runs: dict[tuple, dict] = {}

    def model(self, path: str, config: EvalConfig, device, dtype):
        """The model at ``path`` in eval mode on ``device``, loaded once per (path, device, dtype)."""
        key = (path, str(device), dtype)
        if key not in self._models:
            from pard_train.modelio.model import load_causal_lm

            model = load_causal_lm(path, AttentionBackend.sdpa, dtype, trust_remote_code=config.trust_remote_code)
            self._models[key] = model.to(device).eval()
        return self._models[key]

    def release(self, path: str) -> None:
        """Forget the models loaded from ``path`` (a family's next target may need all the memory)."""
        for key in [key for key in self._models if key[0] == path]:
            del self._models[key]

    def target_runs(self, config: EvalConfig) -> dict:
        """Target-mode results by benchmark for ``config``'s target and everything its decoding depends on (empty
        until an evaluation with target mode fills it): the draft and K do not change target-only decoding."""
        settings = (config.target, config.enable_thinking, config.system_prompt, config.use_chat_template)
        settings += (tuple(config.benchmarks), config.num_prompts, config.max_new_tokens, config.dtype, config.device)
        return self._target_runs.setdefault(tuple(map(str, settings)), {})
