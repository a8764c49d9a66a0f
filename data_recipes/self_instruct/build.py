"""python data_recipes/self_instruct/build.py — turn the Self-Instruct source files into chat training rows.

Writes ``data_recipes/self_instruct/self_instruct.jsonl`` with one ``{"messages": [...]}`` row per instance:
the prompt is the instruction followed, when the instance has an input, by a blank line and the input; the answer
is the human-written output. Rows are shuffled with a fixed seed so that any prefix is a mixed sample.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ["self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented.jsonl"]


def conversations():
    for name in SOURCES:
        for line in (HERE / "source" / name).read_text(encoding="utf-8").splitlines():
            task = json.loads(line)
            for instance in task["instances"]:
                prompt = task["instruction"].strip()
                if instance.get("input", "").strip():
                    prompt += "\n\n" + instance["input"].strip()
                answer = instance.get("output", "").strip()
                if answer:
                    yield {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def main(output: Path = HERE / "self_instruct.jsonl") -> Path:
    rows = list(conversations())
    random.Random(0).shuffle(rows)
    output.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} conversations to {output}")
    return output


if __name__ == "__main__":
    main()
