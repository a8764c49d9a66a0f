"""Every architecture we claim: the loss's labelled logits equal ``model(...).logits`` at the same positions, and the
mask-token chooser finds a usable row for every tokenizer kind we can build offline."""

from __future__ import annotations

import warnings

import pytest
import torch

from pard_train.base.config import ModelConfig
from pard_train.core.attention import AttentionBackend, attention_mask_for
from pard_train.core.layout import IGNORE_INDEX, DropTokenSchedule, build_row, collate_rows
from pard_train.core.loss import SUPPORTED_ARCHITECTURES, labelled_hidden, labelled_logits
from pard_train.methods.pard import pard_loss
from pard_train.modelio.model import load_draft
from pard_train.testing.tiny import build_tiny_model, build_tiny_tokenizer

VOCAB, K = 160, 4
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _config(architecture: str):
    import transformers

    if architecture == "Gemma3ForCausalLM":
        # Real Gemma 3 checkpoints ship final_logit_softcapping: null; a small cap here proves the path is applied.
        return transformers.Gemma3TextConfig(**SHAPE, head_dim=16, final_logit_softcapping=0.5, sliding_window=8)
    if architecture == "Gemma2ForCausalLM":
        return transformers.Gemma2Config(**SHAPE, head_dim=16, final_logit_softcapping=0.5, sliding_window=8)
    name = architecture.removesuffix("ForCausalLM")
    # Phi-3's defaults point bos/eos/pad at id 32000, outside a tiny vocabulary.
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0) if name == "Phi3" else {}
    return getattr(transformers, f"{name}Config")(**SHAPE, **ids)


def _backend(architecture: str) -> AttentionBackend:
    # Gemma 2 has no SDPA path in transformers (its attention soft-capping): FlexAttention, forward-only on CPU.
    return AttentionBackend.flex if architecture == "Gemma2ForCausalLM" else AttentionBackend.sdpa


def _model(architecture: str):
    import transformers

    from pard_train.core.attention import transformers_attn_implementation

    torch.manual_seed(0)
    implementation = transformers_attn_implementation(_backend(architecture))
    model = getattr(transformers, architecture)._from_config(_config(architecture), attn_implementation=implementation)
    return model.eval()


def _batch():
    generator = torch.Generator().manual_seed(0)
    rows = [
        build_row(
            torch.randint(0, VOCAB - 1, (length,), generator=generator),
            VOCAB - 1,
            K,
            document=torch.tensor([0] * (length // 2) + [1] * (length - length // 2)),
            drop_tokens=DropTokenSchedule(0.7, 0.2),
            generator=generator,
        )
        for length in (24, 17)
    ]
    return collate_rows(rows, pad_token_id=0)


@pytest.mark.parametrize("architecture", SUPPORTED_ARCHITECTURES)
def test_labelled_logits_equal_the_models_own_logits(architecture):
    model, batch, backend = _model(architecture), _batch(), _backend(architecture)
    with torch.no_grad():
        ours, labels, _ = labelled_logits(model, batch, backend)
        full = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=attention_mask_for(batch, backend),
            use_cache=False,
        ).logits
    theirs = full[batch.labels != IGNORE_INDEX]
    assert ours.shape == theirs.shape == (int((batch.labels != IGNORE_INDEX).sum()), VOCAB)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The chunked loss scores the same logits.
    with torch.no_grad():
        loss, _ = pard_loss(model, batch, backend, K, normalizer=len(labels))
    expected = torch.nn.functional.cross_entropy(theirs.float(), labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_capping_matters_so_the_test_above_can_fail():
    model, batch = _model("Gemma3ForCausalLM"), _batch()
    with torch.no_grad():
        hidden, _, _ = labelled_hidden(model, batch, AttentionBackend.sdpa)
        raw = model.get_output_embeddings()(hidden)
        capped, _, _ = labelled_logits(model, batch, AttentionBackend.sdpa)
    assert (raw - capped).abs().max() > 0.1 and capped.abs().max() <= 0.5


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role'])"
    " + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b", "What is 12 plus 30?"]


def _sentencepiece_like(specials: list[str]):
    """A Metaspace BPE with byte fallback: the shape of Llama-2, Mistral, Phi-3 and Gemma tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(TEXTS * 20, trainer=trainer)
    return tokenizer


def _gemma_tokenizer(extra_specials: list[str], **tokens):
    """Gemma's layout: <pad> <eos> <bos> <unk>, then ``extra_specials``, then the turn markers, all special."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *extra_specials, "<start_of_turn>", "<end_of_turn>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_sentencepiece_like(specials),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in specials[4:] if t not in tokens.values()],
        **tokens,
    )
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def _tokenizer(kind: str):
    """``(tokenizer, embedding rows, what the chooser should pick)`` for each tokenizer kind buildable offline."""
    from transformers import PreTrainedTokenizerFast

    from pard_train.testing.tiny import train_byte_level_bpe

    if kind == "llama3_reserved":  # byte-level BPE with reserved special tokens, no spare rows
        tokenizer = build_tiny_tokenizer()
        return tokenizer, len(tokenizer), "<|reserved_special_token_"
    if kind in ("qwen2_spare_rows", "qwen3_think_tokens"):  # byte-level BPE, embedding padded above the vocabulary
        raw = train_byte_level_bpe(TEXTS * 20, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], 300)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        if kind == "qwen3_think_tokens":  # added but not special: text produces them, so they are skipped
            tokenizer.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"])
        tokenizer.chat_template = CHATML
        return tokenizer, -(-len(tokenizer) // 64) * 64, "spare row"
    if kind == "gemma_unused":  # SentencePiece-like with <unusedN> special tokens, no spare rows
        tokenizer = _gemma_tokenizer(["<unused0>", "<unused1>"])
        return tokenizer, len(tokenizer), "<unused0>"
    if kind == "phi3_spare_rows":  # SentencePiece-like without reserved tokens, embedding padded (32011 -> 32064)
        specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_sentencepiece_like(specials), bos_token="<s>", eos_token="<|end|>", unk_token="<unk>"
        )
        tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
        tokenizer.chat_template = (
            "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        )
        return tokenizer, len(tokenizer) + 53, "spare row"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["llama3_reserved", "qwen2_spare_rows", "qwen3_think_tokens", "gemma_unused", "phi3_spare_rows"]
)
def test_mask_token_chooser_finds_a_valid_row_for_every_tokenizer_kind(kind):
    from pard_train.core.mask_token import _template_ids, choose_mask_token, validate_mask_token

    tokenizer, rows, expected = _tokenizer(kind)
    chosen = choose_mask_token(tokenizer, rows)
    validate_mask_token(tokenizer, rows, chosen)
    if expected == "spare row":
        assert len(tokenizer) <= chosen < rows
    else:
        assert tokenizer.convert_ids_to_tokens(chosen).startswith(expected)
    # Never produced by text or the template.
    emitted = {i for text in TEXTS for i in tokenizer(text)["input_ids"]} | _template_ids(tokenizer)
    assert chosen not in emitted
    assert chosen not in {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}


@pytest.mark.parametrize(
    "preset, model", [("gemma3_270m", "google/gemma-3-270m-it"), ("gemma3_1b", "google/gemma-3-1b-it")]
)
def test_gemma3_presets_use_an_unused_token_the_chooser_accepts(preset, model):
    from conftest import compose

    from pard_train.base.config import to_config
    from pard_train.core.mask_token import validate_mask_token

    config = to_config(compose(f"+config={preset}"))
    assert (config.model.path, config.model.mask_token_id) == (model, 6)
    assert (config.pard.num_draft_tokens, config.pard.drop_ratio, config.pard.drop_ratio_min) == (8, 0.7, 0.2)
    # Gemma 3's first ids, rebuilt offline in order: id 6 is <unused0>, a special token no text or template emits.
    tokenizer = _gemma_tokenizer(["<mask>", "[multimodal]", *[f"<unused{i}>" for i in range(99)]], mask_token="<mask>")
    assert tokenizer.convert_ids_to_tokens([6, 105, 106]) == ["<unused0>", "<start_of_turn>", "<end_of_turn>"]
    validate_mask_token(tokenizer, len(tokenizer), 6)


def test_loading_an_unchecked_architecture_warns(tmp_path):
    """A family outside SUPPORTED_ARCHITECTURES may post-process its logits in ways the loss does not repeat."""
    import transformers

    tokenizer = build_tiny_tokenizer()
    rows = len(tokenizer) + 8
    neox = transformers.GPTNeoXConfig(
        vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    for name, model in (("neox", transformers.GPTNeoXForCausalLM(neox)), ("llama", build_tiny_model(rows))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    with pytest.warns(UserWarning, match="GPTNeoXForCausalLM is not among the architectures"):
        load_draft(ModelConfig(path=str(tmp_path / "neox")), AttentionBackend.sdpa, K)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_draft(ModelConfig(path=str(tmp_path / "llama")), AttentionBackend.sdpa, K)
