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
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pard_train.data.packing import PackedRow
from pard_train.methods.teacher_cache import labelled_positions
from pard_train.vllm_env.client import VllmEngine


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

    def __init__(self, engine: VllmEngine):
        self.engine, self.vocabulary = engine, engine.vocab_size

    @classmethod
    def start(cls, target: str, settings, max_length: int, dtype: str, log_path: Path) -> VllmScorer:
        """The target in a vLLM engine sized for documents of at most ``max_length`` tokens and ``method.top_k``."""
        engine = VllmEngine(
            target,
            dtype=dtype,
            max_model_len=max_length + 1,  # the longest document, plus the one token each request generates
            log_path=log_path,
            max_logprobs=settings.top_k,
            tensor_parallel_size=settings.cache_tensor_parallel_size,
        )
        return cls(engine)

    def signals(self, rows: list[PackedRow], top_k: int, temperature: float) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per row, as :func:`~pard_train.methods.teacher_cache_builder.row_signals` gives them: ``log g`` ``[L]``
        float32 (0 at each document's first token) and the top-k ids and log-probabilities at its labelled positions,
        in order."""
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
            for begin, end in row_spans:
                document = next(scored)
                if end - begin < 2:
                    continue  # one token: nothing predicts it, and it predicts nothing within its document
                # Row j of a document's scores is the prediction of its token j + 1, made at position j.
                log_g[begin + 1 : end] = torch.from_numpy(document.token_log_p.copy())
                top_ids[begin : end - 1] = torch.from_numpy(document.top_ids.astype("int64"))
                top_log_p[begin : end - 1] = torch.from_numpy(document.top_log_p.copy())
            labelled = labelled_positions(row)
            out.append((log_g, top_ids[labelled], top_log_p[labelled]))
        return out

    def close(self) -> None:
        self.engine.close()
