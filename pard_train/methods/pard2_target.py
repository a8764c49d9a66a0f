"""PARD-2's frozen target, loaded once for the run: bf16 on GPUs, partitioned across ranks under ZeRO-3, checked
against the draft's vocabulary and the feature layers; or the teacher cache that stands in for it
(``method.teacher=cache``: its confidences, top-k log-probabilities and, in dual mode, features). Used by
:class:`pard_train.methods.pard2.Pard2Method`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pard_train.base.config import AttentionBackend, MethodConfig
from pard_train.base.errors import ConfigError
from pard_train.modelio.model import embedding_rows, load_causal_lm
from pard_train.run.distributed import gather_all

logger = logging.getLogger(__name__)


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


def load_target(settings: MethodConfig, draft, backend: AttentionBackend, accelerator):
    """``(target, engine)``: the frozen target on this rank's device (``engine`` None), or under ZeRO-3 the module of
    an inference engine that shards it (transformers partitions while loading; the engine gathers each layer's weights
    for its forward, so no rank ever holds the whole target). Refuses a target whose vocabulary differs from the
    draft's (:class:`~pard_train.methods.teacher.Teacher` refuses feature layers outside its hidden states)."""
    dtype = torch.bfloat16 if accelerator.device.type == "cuda" else torch.float32
    engine = None
    if _zero3_config(accelerator) is not None:
        engine = _sharded_for_inference(load_causal_lm(settings.target, backend, dtype=dtype), accelerator)
        target = engine.module
    else:
        target = load_causal_lm(settings.target, backend, dtype=dtype).to(accelerator.device)
    if embedding_rows(target) != embedding_rows(draft):
        raise ConfigError(
            f"method.target: {settings.target} has {embedding_rows(target)} embedding rows, the draft "
            f"{embedding_rows(draft)}; PARD-2 distils over one shared vocabulary: pick a target of its family"
        )
    return target, engine


def open_teacher_cache(settings: MethodConfig, cache_dir: str | None, draft, data):
    """The finished teacher cache of these rows and settings under ``cache_dir`` (``data.cache_dir``), else one line
    saying what to build."""
    from pard_train.data.documents import default_cache_dir
    from pard_train.methods.teacher_cache import TeacherCache

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    rows = {"train": data.train, "validation": data.validation}
    cache = TeacherCache.open(root, rows, settings.target, settings)
    if cache.vocabulary != embedding_rows(draft):
        raise ConfigError(
            f"method.teacher=cache: the cache's target has {cache.vocabulary} vocabulary rows, the draft "
            f"{embedding_rows(draft)}; PARD-2 distils over one shared vocabulary"
        )
    return cache
