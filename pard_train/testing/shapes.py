"""Random Llama models of named shapes (the weights do not matter): what the throughput and FLOP benchmarks and the GPU
check's sections build, from a tiny smoke shape to Llama-3.2-1B's."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """A random Llama's shape (the weights do not matter for throughput)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


SHAPES = {
    "smoke": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024),
    "cpu-small": ModelShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=32000),
    # The LM head's share of the weights as in Llama-3.2-1B (about a quarter of the layers'), for comparison.
    "cpu-small-v4k": ModelShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, vocab=4096),
    "llama-3.2-1b": ModelShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256),
}


def build_model(shape: ModelShape, attn_implementation: str, device: torch.device, dtype: torch.dtype, length: int):
    """A random LlamaForCausalLM of ``shape`` in training mode, built directly on ``device`` (seed 0, untied head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(4096, length),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with device:  # initialise in place: a 1B model built on the CPU and copied over would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.train()
