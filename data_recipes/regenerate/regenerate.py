"""Regenerate the answers of a conversation set with the target model, so that the draft learns the target's outputs.

    python data_recipes/regenerate/regenerate.py --model Qwen/Qwen2.5-7B-Instruct \
        --input data_recipes/self_instruct/self_instruct.jsonl --output-dir data/regen [--shard 0 --num-shards 8]

Prompts come from any source and format the trainer reads (files, globs, Hugging Face names; messages, ShareGPT,
PARD, prompt/response): each conversation is cut before its last assistant turn and the target writes that turn
(greedy unless --temperature > 0). Rows are written to ``<output-dir>/shard-IIIII-of-NNNNN.jsonl`` as
``{"id", "messages", "finish_reason", "source"}``, which ``data.train_files=[<output-dir>/*.jsonl]`` trains on.

Resumable: rerunning the same command skips the ids its shard file already holds (a line cut by an interruption is
dropped first), so no row is ever written twice. Sharded: ``--shard i --num-shards n`` takes the prompts whose id
hashes to i, so n machines can share a set with no coordination. Generation uses vLLM when its environment is found
(``--backend auto``; ``make vllm`` creates it, ``--vllm-python`` names another), else transformers' batched
``generate`` with the KV cache, prompts batched by length. Both get the same token ids: the chat template is applied
here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from pard_train.base.config import DataFormat, DataSource
from pard_train.base.errors import PardTrainError
from pard_train.data.formats import BadRow, to_messages
from pard_train.data.sources import MALFORMED, DataError, read_raw, resolve


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target model: Hugging Face id or local directory")
    parser.add_argument("--input", required=True, nargs="+", help="files, globs or dataset names of prompts")
    parser.add_argument("--format", default="auto", choices=[f.value for f in DataFormat])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "transformers", "vllm"],
        help="auto: vLLM when its environment is found (make vllm), else transformers",
    )
    parser.add_argument("--vllm-python", default=None, help="the Python of vLLM's environment (default: .venv-vllm)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts (quick runs)")
    parser.add_argument("--chat-template", default=None, help="as data.chat_template, for a model without one")
    args = parser.parse_args(argv)
    if not 0 <= args.shard < args.num_shards:
        parser.error(f"--shard must be in [0, {args.num_shards}), got {args.shard}")
    return args


def prompt_id(row: dict, prompt: list[dict]) -> str:
    """The row's own ``id`` when it has one, else a hash of the prompt (so duplicates collapse)."""
    if isinstance(row.get("id"), (str, int)):
        return str(row["id"])
    return hashlib.sha1(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:20]


def in_shard(identifier: str, shard: int, num_shards: int) -> bool:
    return int(hashlib.sha1(identifier.encode()).hexdigest(), 16) % num_shards == shard


def read_prompts(inputs: list[str], format: DataFormat, limit: int | None):
    """``(id, prompt messages, where)`` per usable conversation, first occurrence of an id only; and skip counts."""
    prompts, seen, skipped = [], set(), Counter()
    for path in inputs:
        for raw, where in zip(*_raw_columns(path, format)):
            try:
                if raw.startswith(MALFORMED):
                    raise BadRow("malformed JSON")
                row = json.loads(raw)
                messages = to_messages(row, format)
                if isinstance(messages, str):
                    raise BadRow("text row", "has no prompt to answer")
            except BadRow as error:
                skipped[error.reason] += 1
                continue
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is None:
                skipped["no user turn"] += 1
                continue
            prompt = messages[: last_user + 1]
            identifier = prompt_id(row, prompt)
            if identifier in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(identifier)
            prompts.append((identifier, prompt, where))
            if limit is not None and len(prompts) >= limit:
                return prompts, skipped
    return prompts, skipped


def _raw_columns(path: str, format: DataFormat):
    dataset = read_raw(resolve(DataSource(path=path, format=format), "--input"))
    return dataset["raw"], dataset["where"]


def open_shard(path: Path) -> set[str]:
    """Ids already written; a last line cut by an interruption is removed so the file stays valid JSONL."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    return {json.loads(line)["id"] for line in complete.decode("utf-8").splitlines() if line.strip()}


def load_tokenizer(model: str, chat_template: str | None):
    from transformers import AutoTokenizer

    from pard_train.data.templates import apply_template_override

    return apply_template_override(AutoTokenizer.from_pretrained(model), chat_template)


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """The prompt as the target continues it: its chat template with the assistant's turn opened (both backends)."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(generation_config, tokenizer) -> set[int]:
    """End-of-turn and EOS ids: the model's generation config (it may list several) and the tokenizer's EOS."""
    stop = getattr(generation_config, "eos_token_id", None)
    return set(stop if isinstance(stop, list) else [stop]) | {tokenizer.eos_token_id} - {None}


def answer_of(tokenizer, tokens: list[int], stopped: bool) -> tuple[str, str]:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip(), "stop" if stopped else "length"


class TransformersGenerator:
    """Batched greedy (or sampled) generation with the KV cache, left-padded."""

    def __init__(self, model: str, chat_template: str | None):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.tokenizer = load_tokenizer(model, chat_template)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
        self.stop = stop_ids(self.model.generation_config, self.tokenizer)

    def __call__(self, prompts: list[list[dict]], max_new_tokens: int, temperature: float) -> list[tuple[str, str]]:
        ids = [prompt_ids(self.tokenizer, prompt) for prompt in prompts]
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.model.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with self.torch.inference_mode():
            output = self.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(self.stop),
                **sampling,
            )
        answers = []
        for tokens in output[:, batch["input_ids"].shape[1] :].tolist():
            stopped = any(token in self.stop for token in tokens)
            if stopped:  # generate pads finished rows after their stop token
                tokens = tokens[: next(i for i, t in enumerate(tokens) if t in self.stop) + 1]
            answers.append(answer_of(self.tokenizer, tokens, stopped))
        return answers


class VllmGenerator:
    """vLLM's engine (continuous batching, much faster than transformers on a GPU), run in vLLM's own environment
    (``make vllm``; see pard_train/vllm_env). Prompts are rendered here and sent as token ids, as for transformers."""

    def __init__(self, model: str, chat_template: str | None, vllm_python: str | None, log_path: Path):
        import torch
        from transformers import GenerationConfig

        from pard_train.vllm_env.client import VllmEngine

        self.tokenizer = load_tokenizer(model, chat_template)
        try:
            generation_config = GenerationConfig.from_pretrained(model)
        except OSError:
            generation_config = None
        self.stop = stop_ids(generation_config, self.tokenizer)
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        print(f"regenerate: starting vLLM ({dtype}; its log: {log_path})", flush=True)
        self.engine = VllmEngine(model, dtype=dtype, python=vllm_python, log_path=log_path)

    def __call__(self, prompts: list[list[dict]], max_new_tokens: int, temperature: float) -> list[tuple[str, str]]:
        ids = [prompt_ids(self.tokenizer, prompt) for prompt in prompts]
        stops = sorted(self.stop)
        result = self.engine.generate(ids, max_tokens=max_new_tokens, stop_token_ids=stops, temperature=temperature)
        return [answer_of(self.tokenizer, o.token_ids, o.finish_reason == "stop") for o in result.outputs]

    def close(self) -> None:
        self.engine.close()


def make_generator(args):
    from pard_train.vllm_env.locate import VllmUnavailable, find_vllm_python

    if args.backend == "auto":
        try:
            find_vllm_python(args.vllm_python)
            args.backend = "vllm"
        except VllmUnavailable:
            args.backend = "transformers"
    if args.backend == "vllm":
        return VllmGenerator(args.model, args.chat_template, args.vllm_python, args.output_dir / "vllm.log")
    return TransformersGenerator(args.model, args.chat_template)


def fail(message: str):
    """A user error: one line on stderr, exit code 2 (as argparse and every pard_train command)."""
    print(f"regenerate: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None, generator=None) -> Path:
    args = parse_args(argv)
    try:
        prompts, skipped = read_prompts(args.input, DataFormat(args.format), args.limit)
    except DataError as error:
        fail(str(error))
    if args.output_dir.exists() and not args.output_dir.is_dir():
        fail(f"--output-dir {args.output_dir} is a file; give a directory (the shards are written into it)")
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"--output-dir {args.output_dir}: {error.strerror}")
    output = args.output_dir / f"shard-{args.shard:05d}-of-{args.num_shards:05d}.jsonl"
    done = open_shard(output)
    mine = [p for p in prompts if in_shard(p[0], args.shard, args.num_shards)]
    todo = [p for p in mine if p[0] not in done]
    print(
        f"regenerate: {len(prompts)} prompts ({dict(skipped) or 'none skipped'}); shard {args.shard}/{args.num_shards}"
        f" has {len(mine)}, {len(mine) - len(todo)} already in {output}, {len(todo)} to generate"
    )
    if not todo:
        return output
    owned = generator is None
    try:
        generator = generator or make_generator(args)
        todo.sort(key=lambda p: len(json.dumps(p[1])))  # similar lengths together: less padding
        finished, started = Counter(), time.perf_counter()
        bar = tqdm(total=len(todo), desc="regenerate", unit="answer", dynamic_ncols=True, leave=False)
        with bar, output.open("a", encoding="utf-8") as handle:
            for begin in range(0, len(todo), args.batch_size):
                batch = todo[begin : begin + args.batch_size]
                answers = generator([p[1] for p in batch], args.max_new_tokens, args.temperature)
                lines = []
                for (identifier, prompt, where), (answer, reason) in zip(batch, answers):
                    row = {"id": identifier, "messages": [*prompt, {"role": "assistant", "content": answer}]}
                    lines.append(json.dumps({**row, "finish_reason": reason, "source": where}, ensure_ascii=False))
                    finished[reason] += 1
                # One write per batch, flushed to disk: an interruption loses at most this batch (and a cut line).
                handle.write("\n".join(lines) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(batch))
    except PardTrainError as error:  # no vLLM environment, or vLLM failed; the rows written so far are kept
        fail(str(error))
    finally:
        if owned and hasattr(generator, "close"):
            generator.close()
    seconds = round(time.perf_counter() - started)
    print(f"regenerate: wrote {sum(finished.values())} rows to {output} ({dict(finished)}) in {seconds} s")
    return output


if __name__ == "__main__":
    main()
