"""The teacher cache's target run by vLLM (``method.cache_engine=vllm``): the engine users already scale a large
target with (tensor parallelism, paged memory, batching), writing the same shards as the transformers builder.

Each document of a packed row is one prompt (documents never attend to each other, and their positions start at 0,
as in training), scored by vLLM's ``SamplingParams(prompt_logprobs=k)``: at every position after a document's first,
vLLM returns the prompt token's own log-probability, which is ``log g(u)``, and the k most likely ids with theirs,
which at a labelled position ``p`` (row ``p`` of the next token) are the cache's top-k. The rest-of-mass bucket is
``1 - sum`` of those, as the loss reads it from either builder.

Temperature 1 only: vLLM scores prompt tokens with a plain ``log_softmax`` of the logits, whatever the sampling
parameters or ``logprobs_mode`` say (``vllm/v1/worker/gpu_model_runner.py``, ``_get_prompt_logprobs_dict``: "prompt
tokens skip sampling processors"), and the top-k at temperature 1 does not give the normaliser at another one. The
config refuses ``method.kd_temperature != 1`` with this engine (:class:`pard_train.base.config.MethodConfig`).

Features (``method.features``): the same requests capture the target's residual stream with vLLM's
``extract_hidden_states`` method (the worker's ``hidden_states`` setting), which is exactly our ``vllm`` capture: aux
id ``i < L`` is ``output_hidden_states[i]``, id ``L`` the final norm's input. Each layer goes as its non-negative id
``l % (L + 1)`` (vLLM matches a negative id to no layer and silently fills its block with another's), each id once;
the file of each document holds them ascending, so its blocks are put back in ``method.feature_layers`` order, as
:func:`~pard_train.evaluate.feature_capture.target_features` concatenates them, and the file is deleted once read.
``method.feature_capture=training`` (the final norm's output) is refused by the config with this engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from pard_train.data.packing import PackedRow
from pard_train.evaluate.feature_capture import aux_ids
from pard_train.methods.teacher_cache import RowSignals, labelled_positions
from pard_train.vllm_env.client import PromptLogprobs, VllmEngine


def documents(row: PackedRow) -> list[tuple[int, int]]:
    """``[(begin, end), ...]``: the row's documents as spans of its real tokens."""
    spans, begin = [], 0
    for index in range(1, len(row.document) + 1):
        if index == len(row.document) or row.document[index] != row.document[begin]:
            spans.append((begin, index))
            begin = index
    return spans


class VllmScorer:
    """One ``vllm.LLM`` holding the target (on ``method.cache_tensor_parallel_size`` GPUs), asked for prompt
    log-probabilities one shard at a time: every document of the shard in one ``generate`` call, which vLLM batches
    and schedules itself."""

    def __init__(self, engine: VllmEngine, blocks: list[int] | None = None):
        """``blocks``: with features, the slot of each of ``method.feature_layers`` in the engine's files."""
        self.engine, self.vocabulary, self.blocks = engine, engine.vocab_size, blocks

    @classmethod
    def start(
        cls, target: str, settings, max_length: int, dtype: str, log_path: Path, states_dir: Path | None = None
    ) -> VllmScorer:
        """The target in a vLLM engine sized for documents of at most ``max_length`` tokens and ``method.top_k``;
        with ``method.features`` it also writes each document's states to ``states_dir``."""
        capture, blocks = {}, None
        if settings.features:
            from transformers import AutoConfig

            num_layers = AutoConfig.from_pretrained(target).get_text_config().num_hidden_layers
            ids = aux_ids(settings.feature_layers, num_layers)
            captured = sorted(set(ids))  # the order vLLM stores them in, each once
            blocks = [captured.index(i) for i in ids]
            Path(states_dir).mkdir(parents=True, exist_ok=True)
            for stale in Path(states_dir).glob("*.safetensors*"):  # a killed build's: request ids start again at 0
                stale.unlink()
            capture["hidden_states"] = {"layer_ids": captured, "directory": str(states_dir)}
        engine = VllmEngine(
            target,
            dtype=dtype,
            max_model_len=max_length + 1,  # the longest document, plus the one token each request generates
            log_path=log_path,
            max_logprobs=settings.top_k,
            tensor_parallel_size=settings.cache_tensor_parallel_size,
            **capture,
        )
        return cls(engine, blocks)

    def _features(self, document: PromptLogprobs, prompt: list[int]) -> Tensor:
        """``[n, len(feature_layers) * H]``: the document's states from its file, in ``feature_layers`` order; the
        file is deleted."""
        from safetensors.torch import load_file

        path = document.hidden_states_path
        data = load_file(path)
        os.remove(path)  # its lock file went when the worker saw it whole (vllm_env/worker.py, _wait_written)
        if data["token_ids"].tolist() != list(prompt):  # the file is the request's: a mix-up would train silently
            raise RuntimeError(f"vLLM's hidden states in {path} are not of the prompt scored")
        states = data["hidden_states"]
        return states[:, self.blocks].reshape(states.shape[0], -1)

    def signals(self, rows: list[PackedRow], top_k: int, temperature: float) -> list[RowSignals]:
        """Per row, as :func:`~pard_train.methods.teacher_cache_builder.row_signals` gives them: ``log g`` ``[L]``
        float32 (0 at each document's first token), the top-k ids and log-probabilities at its labelled positions,
        in order, and the features ``[L, n * H]`` (None without ``method.features``)."""
        assert temperature == 1.0, "the config refuses other temperatures with cache_engine=vllm"
        k = min(top_k, self.vocabulary)
        spans = [documents(row) for row in rows]
        prompts = [row.input_ids[begin:end] for row, row_spans in zip(rows, spans) for begin, end in row_spans]
        scored = iter(self.engine.prompt_logprobs(prompts, k)[0])
        out = []
        for row, row_spans in zip(rows, spans):
            length = len(row.input_ids)
            log_g = torch.zeros(length, dtype=torch.float32)
            top_ids = torch.zeros(length, k, dtype=torch.long)
            top_log_p = torch.zeros(length, k, dtype=torch.float32)
            features = None
            for begin, end in row_spans:
                document = next(scored)
                if self.blocks is not None:
                    states = self._features(document, row.input_ids[begin:end])
                    if features is None:
                        features = states.new_zeros(length, states.shape[-1])
                    features[begin:end] = states
                if end - begin < 2:
                    continue  # one token: nothing predicts it, and it predicts nothing within its document
                # Row j of a document's scores is the prediction of its token j + 1, made at position j.
                log_g[begin + 1 : end] = torch.from_numpy(document.token_log_p.copy())
                top_ids[begin : end - 1] = torch.from_numpy(document.top_ids.astype("int64"))
                top_log_p[begin : end - 1] = torch.from_numpy(document.top_log_p.copy())
            labelled = labelled_positions(row)
            out.append((log_g, top_ids[labelled], top_log_p[labelled], features))
        return out

    def close(self) -> None:
        self.engine.close()
