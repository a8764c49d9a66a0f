"""Tiny tokenizers shaped like a real family's (special tokens, BOS rule, chat template), trained offline: for tests
of rendering, masks and the data cache."""

from __future__ import annotations

from pard_train.data.templates import BUILTIN
from pard_train.testing.tiny import train_byte_level_bpe

FAMILY_TOKENS = {
    # bos, eos (end of turn), pad, other special tokens
    "chatml": (None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"]),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>"]),
}


def build_family_tokenizer(family: str, texts=(), vocab_size: int = 400):
    """A tiny byte-level BPE tokenizer shaped like a real family's (special tokens, BOS rule, chat template),
    trained offline in well under a second: for tests of rendering and masks, never for training real drafts.

    ``llama3`` adds BOS through its post-processor, as Llama 3's tokenizer does; ``chatml`` has no BOS, as Qwen's.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, others = FAMILY_TOKENS[family]
    specials = [t for t in (bos, eos, pad, *others) if t]
    tokenizer = train_byte_level_bpe(["Hello there, how are you? I am fine.", *texts], specials, vocab_size)
    if bos:
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, additional_special_tokens=others
    )
    wrapped.chat_template = BUILTIN[family]
    return wrapped
