"""Build the kind of public chat mix real drafts are trained on (UltraChat + ShareGPT), by dataset name; online only.

    python data_recipes/public_mix/build.py --output data/public_mix.jsonl [--max-per-source 100000] [--seed 0]

Downloads each dataset with ``datasets.load_dataset``, normalises every row to ``{"messages": [...]}`` with the
trainer's own format readers (rows it could not train on are skipped and counted), caps each source, shuffles with
a fixed seed and writes one JSONL file atomically. Then regenerate the answers with the target
(data_recipes/regenerate) and train on the result. On a machine without network it stops with one clear line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pard_train.base.atomic import atomic_write_text
from pard_train.base.config import DataFormat
from pard_train.data.formats import BadRow, to_messages


@dataclass(frozen=True)
class PublicSource:
    name: str
    split: str
    format: DataFormat
    data_files: str | None = None


MIX = [
    PublicSource("HuggingFaceH4/ultrachat_200k", "train_sft", DataFormat.messages),
    PublicSource(
        "anon8231489123/ShareGPT_Vicuna_unfiltered",
        "train",
        DataFormat.sharegpt,
        data_files="ShareGPT_V3_unfiltered_cleaned_split.json",
    ),
]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"


def load(source: PublicSource):
    import datasets

    if offline():
        sys.exit(
            f"public_mix: error: this machine is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1), so {source.name} "
            "cannot be downloaded; run this recipe on a machine with network and copy its output here"
        )
    try:
        return datasets.load_dataset(source.name, split=source.split, data_files=source.data_files)
    except Exception as error:
        sys.exit(f"public_mix: error: cannot download {source.name}: {str(error).splitlines()[0][:200]}")


def rows_of(source: PublicSource, cap: int, seed: int):
    dataset = load(source).shuffle(seed=seed)
    kept, skipped = [], Counter()
    for row in dataset:
        try:
            messages = to_messages(row, source.format)
        except BadRow as error:
            skipped[error.reason] += 1
            continue
        kept.append({"messages": messages, "source": source.name})
        if len(kept) >= cap:
            break
    print(f"public_mix: {source.name}: {len(kept)} conversations, skipped {dict(skipped) or 'none'}")
    return kept


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--max-per-source", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [row for source in MIX for row in rows_of(source, args.max_per_source, args.seed)]
    random.Random(args.seed).shuffle(rows)
    atomic_write_text(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"public_mix: wrote {len(rows)} conversations to {args.output}")
    return args.output


if __name__ == "__main__":
    main()
