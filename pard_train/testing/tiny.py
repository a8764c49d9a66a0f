"""A tiny Llama-architecture model and byte-level BPE tokenizer built offline, for tests and the ``tiny`` preset.

The tokenizer mirrors the shape of the real families: a ChatML-style chat template, end-of-turn tokens, and reserved
special tokens that ordinary text never produces (one of them becomes the mask token). The embedding matrix has
padded rows above the vocabulary, as Qwen's has, so automatic mask-id selection has something to choose from.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pard_train.base.atomic import atomic_directory

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]

_SEED_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea and the sky.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 plus 30? Answer: 42.",
    "You are a helpful assistant. Please answer the question below.",
]


def train_byte_level_bpe(texts: Iterable[str], special_tokens: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512):
    """Train a byte-level BPE tokenizer in well under a second and wrap it as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_byte_level_bpe([*_SEED_TEXT, *texts], SPECIAL_TOKENS, vocab_size)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def padded_rows(tokenizer) -> int:
    """Embedding rows for ``tokenizer``: rounded up to 64, plus 64 spare rows above the vocabulary (as Qwen pads), so
    automatic mask-id selection has unused rows to choose from. Every tiny model and pair is built with this."""
    return -(-len(tokenizer) // 64) * 64 + 64


def build_tiny_model(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **overrides):
    """A randomly initialised LlamaForCausalLM with ``vocab_size`` rows (pad above the tokenizer for spare rows).

    Heads of 32 dimensions: the smallest vLLM's CPU attention runs, so every tiny draft can be served by vLLM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        max_position_embeddings=4096,
        # Untied unless a test asks for a tied head.
        **{
            "num_attention_heads": hidden_size // 32,
            "num_key_value_heads": 1,
            "tie_word_embeddings": False,
            **overrides,
        },
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def ensure_tiny_checkpoint(path: str | Path, texts: Iterable[str] = (), seed: int = 0) -> Path:
    """Build the tiny model and tokenizer into ``path`` once; later calls reuse it."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(padded_rows(tokenizer), seed=seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Written beside the target and renamed into place, so an interrupted build is never mistaken for a checkpoint.
    with atomic_directory(path) as staging:
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging)
    return path
