"""Benchmark prompt sets (shipped in ``benchmarks/``, or any JSONL) and their rendering with the chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pard_train.base.errors import BenchmarkError  # noqa: F401 - re-exported

BENCHMARK_DIR = Path(__file__).parent / "benchmarks"
BUILTIN = ("humaneval", "gsm8k", "math_500", "mt_bench")
PROMPT_KEYS = ("data", "prompt", "question", "instruction", "text")


@dataclass
class Prompt:
    """One benchmark item: the user turns of a conversation (MT-Bench has two, the others one)."""

    id: str
    turns: list[str]


def _turns(row: dict, where: str) -> list[str]:
    if isinstance(row.get("turns"), list) and row["turns"]:
        return [str(turn) for turn in row["turns"]]
    if isinstance(row.get("messages"), list):
        turns = [m["content"] for m in row["messages"] if isinstance(m, dict) and m.get("role") == "user"]
        if turns:
            return turns
    for key in PROMPT_KEYS:
        if isinstance(row.get(key), str) and row[key].strip():
            return [row[key]]
    raise BenchmarkError(f"{where}: no prompt found; give 'turns', 'messages' or one of {', '.join(PROMPT_KEYS)}")


SPLITS = ("tune", "report")
"""``NAME:tune`` is the first half of a built-in benchmark, ``NAME:report`` the second: choose settings (K, layers,
training) on the first, report on the second, which nothing was tuned on."""


def _split(name_or_path: str) -> tuple[str, str | None]:
    name, _, split = name_or_path.partition(":")
    if split and name in BUILTIN:
        if split not in SPLITS:
            raise BenchmarkError(f"benchmark {name_or_path!r}: the split must be one of {', '.join(SPLITS)}")
        return name, split
    return name_or_path, None


def resolve(name_or_path: str) -> tuple[str, Path]:
    """``(name, path)`` of a built-in benchmark name (with or without a split) or a JSONL path."""
    name_or_path, _ = _split(name_or_path)
    if name_or_path in BUILTIN:
        return name_or_path, BENCHMARK_DIR / f"{name_or_path}.jsonl"
    path = Path(name_or_path)
    if not path.is_file():
        raise BenchmarkError(
            f"benchmark {name_or_path!r} is neither a built-in ({', '.join(BUILTIN)}) nor an existing JSONL file"
        )
    return path.stem, path


def load_prompts(name_or_path: str, limit: int | None = None) -> tuple[str, list[Prompt]]:
    """Read the first ``limit`` prompts (all if None) of a benchmark or of its split; returns ``(name, prompts)``."""
    name, path = resolve(name_or_path)
    split = _split(name_or_path)[1]
    prompts: list[Prompt] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BenchmarkError(f"{path}: not UTF-8 text (byte {error.start}); a benchmark is a JSONL file") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if split is not None:
        half = len(numbered) // 2
        numbered = numbered[:half] if split == "tune" else numbered[half:]
    for number, line in numbered:
        if limit is not None and len(prompts) >= limit:
            break
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise BenchmarkError(f"{where}: each line must be a JSON object")
        prompts.append(Prompt(id=str(row.get("question_id", row.get("id", len(prompts)))), turns=_turns(row, where)))
    if not prompts:
        raise BenchmarkError(f"{path}: no prompts")
    return name, prompts


def render(
    tokenizer,
    messages: list[dict],
    *,
    system_prompt: str | None,
    enable_thinking: bool = False,
    use_chat_template: bool = True,
) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn.

    The system prompt is dropped (folded into nothing) if the template rejects a system role (e.g. Gemma's).
    ``enable_thinking`` is passed to the template: Qwen3's reads it, others ignore it.
    """
    if not use_chat_template or not getattr(tokenizer, "chat_template", None):
        if use_chat_template:
            raise BenchmarkError(
                "the tokenizer has no chat template; use an instruct model or set use_chat_template=false"
            )
        return tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    conversation = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, enable_thinking=enable_thinking)
    try:
        encoded = tokenizer.apply_chat_template(conversation, **kwargs)
    except Exception:  # noqa: BLE001 — a template that raises on a system role: retry without it
        if not system_prompt:
            raise
        encoded = tokenizer.apply_chat_template(messages, **kwargs)
    ids = encoded["input_ids"]
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)
