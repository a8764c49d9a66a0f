"""python scripts/bench/lm_head_loss.py [--smoke] [--repeats 5] [--out bench_results/lm_head_loss.json]

Training step time with the PARD loss computing the LM head once (gradients taken in the forward,
pard_train/core/lm_head_loss.py) against the previous loss, which wrapped each chunk in torch.utils.checkpoint and so
ran
the head matmul and the softmax again in the backward pass. CPU, K=8, L=512 with drop-token, one packed row, fp32,
a whole step each (decoder forward, loss, backward, AdamW). Two random Llama models:

- the tiny preset's shape (a 2-layer Llama, 64 wide, 576-row vocabulary): the head is a small part of the step;
- a SmolLM2-135M-shaped head (49152 x 576, tied to the input embedding as in SmolLM2) on 2 decoder layers of
  SmolLM2's width (not its 30): the head dominates the step.

Both variants train the same model on the same batch, measured alternately (which goes first alternates too), so load
on the machine affects both; the median of --repeats steps after one warm-up step each. The first step's loss and
gradients of the two are compared (they compute the same function). The head and loss alone (forward and backward on
fixed hidden states) are timed the same way. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import markdown_table, metadata, write_json
from torch.utils.checkpoint import checkpoint

from pard_train.core.attention import AttentionBackend
from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows
from pard_train.core.lm_head_loss import CHUNK_TOKENS, chunked_head_loss, project_logits
from pard_train.core.loss import labelled_hidden
from pard_train.methods.pard import pard_loss

SDPA = AttentionBackend.sdpa


def checkpointed_head_loss(model, hidden, labels, normalizer: float) -> torch.Tensor:
    """The previous loss, kept here only to be measured against: each chunk's head and cross-entropy recomputed in
    the backward pass."""

    def chunk_loss(hidden, labels):
        logits = project_logits(model, hidden).float()
        return F.cross_entropy(logits, labels, reduction="none")

    losses = [
        checkpoint(chunk_loss, h, y, use_reentrant=False)
        for h, y in zip(hidden.split(CHUNK_TOKENS), labels.split(CHUNK_TOKENS))
    ]
    return torch.cat(losses).sum() / normalizer


def head_once_loss(model, hidden, labels, normalizer: float) -> torch.Tensor:
    def cross_entropy(logits, part):
        token_loss = F.cross_entropy(logits.float(), labels[part], reduction="none")
        return token_loss, (token_loss.detach(),)

    return chunked_head_loss(model, hidden, cross_entropy, normalizer, CHUNK_TOKENS)[0]


def checkpointed_pard_loss(model, batch, normalizer: float) -> torch.Tensor:
    hidden, labels, _ = labelled_hidden(model, batch, SDPA)
    return checkpointed_head_loss(model, hidden, labels, normalizer)


def pard_loss_now(model, batch, normalizer: float) -> torch.Tensor:
    return pard_loss(model, batch, SDPA, 8, normalizer)[0]


VARIANTS = {"checkpointed chunks (before)": checkpointed_pard_loss, "head once (after)": pard_loss_now}
LOSS_ONLY = {"checkpointed chunks (before)": checkpointed_head_loss, "head once (after)": head_once_loss}


MODELS = {
    # name: (vocabulary, width, layers, heads, kv heads, intermediate, tied head)
    "tiny preset shape": (576, 64, 2, 4, 2, 128, False),
    "SmolLM2-135M head, 2 layers": (49152, 576, 2, 9, 3, 1536, True),
}


def build_model(vocab, width, layers, heads, kv_heads, intermediate, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).train()
    model.set_attn_implementation("sdpa")
    return model


def make_batch(vocab: int, length: int, num_depths: int):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab - 1, (length,), generator=generator)
    row = build_row(ids, vocab - 1, num_depths, drop_tokens=DropTokenSchedule(0.7, 0.2), generator=generator)
    return collate_rows([row], pad_token_id=0)


def one_step(model, optimizer, loss_fn, batch, normalizer) -> float:
    start = time.perf_counter()
    loss_fn(model, batch, normalizer).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def same_function(model, batch, normalizer) -> dict:
    """Loss and largest relative gradient difference of the two variants on the same weights."""
    losses, grads = [], []
    for loss_fn in VARIANTS.values():
        loss = loss_fn(model, batch, normalizer)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    worst = max(float((a - b).norm() / b.norm().clamp(min=1e-30)) for a, b in zip(*grads))
    return {"loss_before": losses[0], "loss_after": losses[1], "max_relative_grad_difference": worst}


def loss_only_times(model, batch, normalizer, repeats) -> dict[str, list[float]]:
    """The head and loss alone, forward and backward, on fixed hidden states (no decoder, no optimizer)."""
    with torch.no_grad():
        hidden, labels, _ = labelled_hidden(model, batch, SDPA)
    hidden.requires_grad_(True)
    times = {variant: [] for variant in LOSS_ONLY}
    for repeat in range(repeats + 1):  # the first round warms up
        order = list(LOSS_ONLY.items()) if repeat % 2 == 0 else list(LOSS_ONLY.items())[::-1]
        for variant, loss_fn in order:
            start = time.perf_counter()
            loss_fn(model, hidden, labels, normalizer).backward()
            model.zero_grad(set_to_none=True)
            hidden.grad = None
            if repeat:
                times[variant].append(time.perf_counter() - start)
    return times


def measure(name: str, shape: tuple, length: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_model(*shape)
    batch = make_batch(shape[0], length, 8)
    normalizer = float(batch.num_labels)
    check = same_function(model, batch, normalizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = {variant: [] for variant in VARIANTS}
    for loss_fn in VARIANTS.values():  # warm-up: first-touch allocations, optimizer state
        one_step(model, optimizer, loss_fn, batch, normalizer)
    for repeat in range(repeats):
        order = list(VARIANTS.items()) if repeat % 2 == 0 else list(VARIANTS.items())[::-1]
        for variant, loss_fn in order:
            times[variant].append(one_step(model, optimizer, loss_fn, batch, normalizer))
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    before, after = medians.values()
    loss_times = loss_only_times(model, batch, normalizer, repeats)
    loss_before, loss_after = (statistics.median(values) for values in loss_times.values())
    return {
        "model": name,
        "vocab": shape[0],
        "width": shape[1],
        "layers": shape[2],
        "L": length,
        "labelled_tokens": batch.num_labels,
        "step_s_before": before,
        "step_s_after": after,
        "speedup": before / after,
        "times_s": times,
        "loss_only_s_before": loss_before,
        "loss_only_s_after": loss_after,
        "loss_only_speedup": loss_before / loss_after,
        "loss_only_times_s": loss_times,
        **check,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="L=64, tiny model only, 2 repeats (CI)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench_results/lm_head_loss.json"))
    args = parser.parse_args()
    length, repeats = (64, 2) if args.smoke else (512, args.repeats)
    models = dict(list(MODELS.items())[:1]) if args.smoke else MODELS
    results = [measure(name, shape, length, repeats) for name, shape in models.items()]
    rows = [
        [
            r["model"],
            f"{r['vocab']} x {r['width']}",
            r["labelled_tokens"],
            f"{r['step_s_before']:.3f}",
            f"{r['step_s_after']:.3f}",
            f"{r['speedup']:.2f}x",
            f"{r['loss_only_s_before']:.3f}",
            f"{r['loss_only_s_after']:.3f}",
            f"{r['loss_only_speedup']:.2f}x",
            f"{r['max_relative_grad_difference']:.1e}",
        ]
        for r in results
    ]
    header = ["model", "head (vocab x width)", "labelled tokens", "step before s", "step after s", "step speed-up"]
    header += ["loss before s", "loss after s", "loss speed-up", "grad diff"]
    print(markdown_table(header, rows))
    write_json(args.out, {"meta": metadata(torch.device("cpu"), K=8, L=length, repeats=repeats), "results": results})


if __name__ == "__main__":
    main()
