"""A tiny target and a tiny draft sharing one tokenizer, built offline (tests and the ``tiny`` evaluation preset).

Both are random: their acceptance length means nothing, but every code path of the harness runs on them in seconds.
"""

from __future__ import annotations

from pathlib import Path

from pard_train.base.atomic import atomic_directory
from pard_train.core.mask_token import choose_mask_token
from pard_train.modelio.draft_format import CONFIG_FILE
from pard_train.modelio.model import mark_as_pard
from pard_train.testing.tiny import build_tiny_model, build_tiny_tokenizer, padded_rows


def build_pair(draft_seed: int = 0, target_seed: int = 1, num_draft_tokens: int = 4):
    """In memory: ``(target, draft, tokenizer, mask_token_id)``, eval mode, float32; the draft marked as PARD."""
    tokenizer = build_tiny_tokenizer()
    rows = padded_rows(tokenizer)
    target = build_tiny_model(rows, seed=target_seed).eval()
    draft = build_tiny_model(rows, seed=draft_seed).eval()
    mask_token_id = choose_mask_token(tokenizer, rows)
    mark_as_pard(draft, mask_token_id, num_draft_tokens)
    for model in (target, draft):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return target, draft, tokenizer, mask_token_id


def ensure_tiny_pair(target_dir: str | Path, draft_dir: str | Path, num_draft_tokens: int = 4) -> tuple[Path, Path]:
    """Write the pair into two directories once (each renamed into place when complete); reuse them later."""
    target_dir, draft_dir = Path(target_dir), Path(draft_dir)
    if all((path / CONFIG_FILE).exists() for path in (target_dir, draft_dir)):
        return target_dir, draft_dir
    target, draft, tokenizer, _ = build_pair(num_draft_tokens=num_draft_tokens)
    for model, path in ((target, target_dir), (draft, draft_dir)):
        with atomic_directory(path) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return target_dir, draft_dir


def ensure_tiny_family(target_dirs: list[str | Path], draft_dir: str | Path, num_draft_tokens: int = 4) -> None:
    """A tiny family: targets of growing depth and width sharing one tokenizer and vocabulary, and a PARD draft that
    is a copy of the first (smallest) target — so it drafts that one well and the larger ones at random, which makes
    the family sweep's AL matrix show a real difference. Built once; reused later."""
    target_dirs, draft_dir = [Path(p) for p in target_dirs], Path(draft_dir)
    if all((path / CONFIG_FILE).exists() for path in (*target_dirs, draft_dir)):
        return
    tokenizer = build_tiny_tokenizer()
    rows = padded_rows(tokenizer)
    mask_token_id = choose_mask_token(tokenizer, rows)
    for index, path in enumerate([*target_dirs, draft_dir]):
        is_draft = index == len(target_dirs)
        size = 0 if is_draft else index  # the draft repeats the smallest target's shape and seed
        model = build_tiny_model(rows, hidden_size=64 + 32 * size, num_layers=2 + size, seed=1 + size).eval()
        if is_draft:
            mark_as_pard(model, mask_token_id, num_draft_tokens)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        with atomic_directory(path) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
