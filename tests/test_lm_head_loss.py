"""The chunked LM-head loss computes each chunk's gradients in the forward pass: the loss and the gradients of the
hidden states and of the head (tied or not, with or without bias) equal the direct unchunked computation, for PARD's
cross-entropy and PARD-2's weighted CE + KD, under gradient accumulation and bf16 autocast; and only one chunk's
logits exist at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from launch import REPO

import pard_train.core.lm_head_loss as lm_head_loss
from pard_train.core.lm_head_loss import chunked_head_loss, project_logits
from pard_train.methods.pard2_loss import _kd
from pard_train.testing.tiny import build_tiny_model

VOCAB, WIDTH, TOKENS = 96, 64, 53


def _model(tied: bool, bias: bool):
    model = build_tiny_model(VOCAB, hidden_size=WIDTH, seed=0).train()
    if tied:  # one Parameter for the input embedding and the head, as tied checkpoints load
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if bias:
        head = torch.nn.Linear(WIDTH, VOCAB, bias=True)
        torch.nn.init.normal_(head.bias, std=0.5)
        model.set_output_embeddings(head)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model


def _ce_terms(labels):
    def terms(logits, part):
        token_loss = F.cross_entropy(logits.float(), labels[part], reduction="none")
        return token_loss, (token_loss.detach(), (logits.detach().argmax(-1) == labels[part]).float())

    return terms


def _ce_kd_terms(labels, weights, teacher_logits, tau=2.0):
    def terms(logits, part):
        logits = logits.float()
        ce = F.cross_entropy(logits, labels[part], reduction="none")
        kd = _kd(logits, teacher_logits[part], tau)
        return weights[part] * (0.3 * ce + 1.0 * kd), (ce.detach(), kd.detach())

    return terms


def _direct(model, hidden, labels, weights, teacher_logits, kind, tau=2.0):
    """Every token's logits at once, autograd all the way."""
    logits = project_logits(model, hidden).float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    if kind == "ce":
        return ce
    kl = F.kl_div(
        F.log_softmax(logits / tau, -1), F.log_softmax(teacher_logits / tau, -1), log_target=True, reduction="none"
    )
    kd = kl.sum(-1) * tau**2
    return weights * (0.3 * ce + 1.0 * kd)


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    weights = torch.rand(TOKENS, generator=generator)  # CAT-like per-token weights
    teacher_logits = torch.randn(TOKENS, VOCAB, generator=generator) * 3
    noise = torch.randn(TOKENS, WIDTH, generator=generator, requires_grad=True)
    return ids, labels, weights, teacher_logits, noise


def _hidden(model, ids, noise):
    # Through the input embedding, so that a tied head's weight gets gradient from both of its uses.
    return model.get_input_embeddings()(ids) + noise


@pytest.mark.parametrize("kind", ["ce", "ce+kd"])
@pytest.mark.parametrize(("tied", "bias"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_loss_and_gradients_equal_the_direct_computation(kind, tied, bias, chunk):
    model = _model(tied, bias)
    params = dict(model.named_parameters())
    ids, labels, weights, teacher_logits, noise = _inputs()
    normalizer = float(weights.sum()) if kind == "ce+kd" else 40.0

    direct = _direct(model, _hidden(model, ids, noise), labels, weights, teacher_logits, kind).sum() / normalizer
    direct.backward()
    expected = {name: p.grad.clone() for name, p in params.items() if p.grad is not None}
    expected_noise = noise.grad.clone()
    model.zero_grad()
    noise.grad = None

    # Two micro-batches of one accumulated step, each loss divided by the accumulation steps as accelerate does.
    losses = 0.0
    for part in (slice(0, 20), slice(20, TOKENS)):
        hidden = _hidden(model, ids[part], noise[part])
        if kind == "ce":
            terms = _ce_terms(labels[part])
        else:
            terms = _ce_kd_terms(labels[part], weights[part], teacher_logits[part])
        loss, outputs = chunked_head_loss(model, hidden, terms, normalizer, chunk)
        assert all(value.shape == (hidden.shape[0],) and not value.requires_grad for value in outputs)
        (loss / 2).backward()
        losses += loss.item()

    assert losses == pytest.approx(direct.item(), rel=1e-5)
    torch.testing.assert_close(noise.grad * 2, expected_noise, rtol=1e-5, atol=1e-7)
    head = model.get_output_embeddings()
    assert head.weight.grad is not None and (not bias or head.bias.grad is not None)
    for name, p in params.items():
        if name in expected:
            torch.testing.assert_close(p.grad * 2, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_gradients_it_returns_the_same_loss_and_outputs():
    model = _model(False, False)
    ids, labels, _, _, noise = _inputs()
    hidden = _hidden(model, ids, noise)
    loss, (token_loss, hit) = chunked_head_loss(model, hidden, _ce_terms(labels), 10.0, 8)
    with torch.no_grad():
        quiet, (quiet_loss, quiet_hit) = chunked_head_loss(model, hidden, _ce_terms(labels), 10.0, 8)
    assert not quiet.requires_grad and quiet.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(quiet_loss, token_loss) and torch.equal(quiet_hit, hit)
    logits = project_logits(model, hidden.detach())
    assert torch.equal(hit, (logits.argmax(-1) == labels).float())  # the metrics come from the same single pass


def test_no_labelled_tokens_gives_zero_loss_and_zero_gradients():
    model = _model(False, False)
    hidden = torch.zeros(0, WIDTH, requires_grad=True)
    loss, (token_loss, _) = chunked_head_loss(model, hidden, _ce_terms(torch.zeros(0, dtype=torch.long)), 1.0, 8)
    loss.backward()
    assert loss.item() == 0 and token_loss.numel() == 0
    assert torch.count_nonzero(model.get_output_embeddings().weight.grad) == 0


def test_bf16_autocast_follows_the_direct_computation():
    model = _model(True, False)
    ids, labels, _, _, noise = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = _direct(model, _hidden(model, ids, noise), labels, None, None, "ce").sum() / 40
    direct.backward()
    expected = model.get_output_embeddings().weight.grad.clone()
    expected_noise = noise.grad.clone()
    model.zero_grad()
    noise.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_head_loss(model, _hidden(model, ids, noise), _ce_terms(labels), 40.0, 16)
    loss.backward()
    assert model.get_output_embeddings().weight.grad.dtype == torch.float32  # fp32 master weights get fp32 grads
    assert loss.item() == pytest.approx(direct.item(), rel=1e-2)
    # bf16 rounds the direct path's one big matmul and the chunks' small ones differently: compare as a whole.
    for got, want in ((model.get_output_embeddings().weight.grad, expected), (noise.grad, expected_noise)):
        assert float((got - want).norm() / want.norm()) < 2e-2


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_head_without_native_bf16_matmul_follows_autocast(monkeypatch, bias):
    """Where the CPU has no bf16 matrix support the head's products run in fp32 on bf16-rounded operands (torch's
    fallback is 10-90x slower): autocast's dtypes, and its loss and gradients up to summation order."""
    runs = []
    for native in (True, False):
        monkeypatch.setattr(lm_head_loss, "_native_bf16_matmul", lambda native=native: native)
        model = _model(False, bias)
        ids, labels, _, _, noise = _inputs()
        head = model.get_output_embeddings()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lm_head_loss.head_linear(noise, head.weight, head.bias).dtype == torch.bfloat16
            loss, (token_loss, _) = chunked_head_loss(model, _hidden(model, ids, noise), _ce_terms(labels), 40.0, 16)
        loss.backward()
        grads = [noise.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
        assert all(grad.dtype == torch.float32 for grad in grads)
        runs.append((loss.detach(), token_loss, grads))
    (loss, token_loss, grads), (fast_loss, fast_token_loss, fast_grads) = runs
    assert fast_loss.item() == pytest.approx(loss.item(), rel=1e-3)
    torch.testing.assert_close(fast_token_loss, token_loss, rtol=2e-2, atol=2e-2)
    for got, want in zip(fast_grads, grads):
        assert float((got - want).norm() / want.norm()) < 1e-2
    # Outside autocast it is F.linear itself, whatever the CPU.
    hidden, weight = torch.randn(5, WIDTH), torch.randn(VOCAB, WIDTH)
    assert torch.equal(lm_head_loss.head_linear(hidden, weight), F.linear(hidden, weight))


_PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    from pard_train.core.lm_head_loss import chunked_head_loss
    from pard_train.testing.tiny import build_tiny_model

    torch.set_num_threads(1)
    tokens, vocab, width, chunk = (int(a) for a in sys.argv[1:5])
    model = build_tiny_model(vocab, hidden_size=width, num_layers=1).train()
    hidden = torch.randn(tokens, width, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))

    def terms(logits, part):
        token_loss = F.cross_entropy(logits.float(), labels[part], reduction="none")
        return token_loss, (token_loss.detach(),)

    chunked_head_loss(model, hidden[:16], terms, 1.0, 16)[0].backward()  # imports and small buffers, not the peak
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, _ = chunked_head_loss(model, hidden, terms, float(tokens), chunk)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": (after - before) * 1024}))
    """
)


def _peak_growth(tokens, vocab, width, chunk) -> int:
    command = [sys.executable, "-c", _PEAK, str(tokens), str(vocab), str(width), str(chunk)]
    # A fixed mmap threshold: glibc's adaptive one would keep freed chunk buffers in the heap and count them again.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["growth_bytes"]


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_chunk_not_the_tokens():
    tokens, vocab, width = 8192, 16384, 32
    all_logits = tokens * vocab * 4  # 512 MiB of fp32 logits if every token's existed at once
    chunked = _peak_growth(tokens, vocab, width, 256)  # one chunk's logits: 16 MiB
    assert chunked < all_logits / 4, chunked
    whole = _peak_growth(tokens, vocab, width, tokens)  # the measurement tells: one chunk of everything
    assert whole > all_logits, whole
