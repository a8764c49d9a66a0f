"""python scripts/bench/derived_layer_choice.py --model runs/cache/smollm2-135m-instruct
    --data 'runs/cache/demo-data/*.jsonl' [--keep 4] [--rows 24] [--out FILE.json]

Which layers a derived draft should keep, measured before any training: the next-token cross-entropy and top-1
agreement with the source model's own greedy choice (what a draft must reproduce to be accepted) of drafts keeping
``--keep`` layers under several rules (evenly spaced, first N, first N-1 plus the last, ...), on the assistant tokens
of the training answers (the target's own outputs; no benchmark prompt is looked at). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import torch
from _common import metadata, write_json
from transformers import AutoModelForCausalLM, AutoTokenizer

from pard_train.modelio.derive import derive_model, evenly_spaced


def rules(keep: int, total: int) -> dict[str, list[int]]:
    return {
        "evenly spaced (the count rule)": evenly_spaced(keep, total),
        "first N": list(range(keep)),
        "first N-1 + last": [*range(keep - 1), total - 1],
        "first N-2 + last 2": [*range(keep - 2), total - 2, total - 1],
        "first + last N-1": [0, *range(total - keep + 1, total)],
    }


def conversations(pattern: str, tokenizer, rows: int) -> list[tuple[torch.Tensor, int]]:
    """(token ids, index of the first answer token) of the first ``rows`` conversations."""
    out = []
    for path in sorted(glob.glob(pattern)):
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = prompt + messages[-1]["content"]
            ids = tokenizer(full, return_tensors="pt", add_special_tokens=False).input_ids[0]
            start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            out.append((ids, start))
            if len(out) == rows:
                return out
    return out


@torch.no_grad()
def score(model, source_predictions: list[torch.Tensor], data) -> dict:
    loss = agree = count = 0.0
    for (ids, start), reference in zip(data, source_predictions, strict=True):
        logits = model(ids[None]).logits[0, start - 1 : -1]
        loss += torch.nn.functional.cross_entropy(logits, ids[start:], reduction="sum").item()
        agree += (logits.argmax(-1) == reference).sum().item()
        count += len(reference)
    return {"cross_entropy": loss / count, "agreement_with_source": agree / count, "tokens": int(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="glob of chat JSONL (the target's answers)")
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("bench_results/derived_layer_choice.json"))
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    source = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    data = conversations(args.data, tokenizer, args.rows)
    with torch.no_grad():
        predictions = [source(ids[None]).logits[0, start - 1 : -1].argmax(-1) for ids, start in data]
    results = {"source (all layers)": {"layers": None, **score(source, predictions, data)}}
    for name, kept in rules(args.keep, source.config.num_hidden_layers).items():
        draft, _ = derive_model(source, kept)
        results[name] = {"layers": kept, **score(draft, predictions, data)}
    tokens = results["source (all layers)"]["tokens"]
    print(f"\n{args.keep} kept layers of {source.config.num_hidden_layers}, {tokens} answer tokens")
    print("| rule | layers | cross-entropy | top-1 = source's greedy |")
    print("|---|---|---|---|")
    for name, row in results.items():
        agreement = 100 * row["agreement_with_source"]
        print(f"| {name} | {row['layers'] or 'all'} | {row['cross_entropy']:.2f} | {agreement:.1f}% |")
    write_json(args.out, {"meta": metadata(), "settings": vars(args) | {"out": str(args.out)}, "results": results})


if __name__ == "__main__":
    main()
