"""The time of one cached forward of a model: what the K sweep's and the wall-clock report's expected speed-ups are
built from (imported by both, so neither imports the other)."""

from __future__ import annotations

import time

import torch

from pard_train.evaluate.speculative import crop_cache, synchronize


def forward_seconds(model, context: int, new_tokens: int, repeats: int) -> float:
    """Wall time of one cached forward of ``new_tokens`` tokens (all their logits kept) after ``context``: the fastest
    of ``repeats``, since other load on a shared machine only ever adds time (a median still carries it)."""

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    step = torch.randint(0, vocab, (1, new_tokens), generator=generator).to(device)
    positions = torch.arange(context, context + new_tokens, device=device)[None]
    times = []
    with torch.no_grad():
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        for _ in range(repeats + 1):  # the first forward warms up and is not counted
            synchronize(device)
            begin = time.perf_counter()
            model(
                input_ids=step,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=new_tokens,
            )
            synchronize(device)
            times.append(time.perf_counter() - begin)
            crop_cache(cache, context)
    return min(times[1:])
