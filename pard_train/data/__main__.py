"""python -m pard_train.data FILE... [--tokenizer PATH | --tiny] — tokenise, pack and report a data set.

Prints what the trainer would print (rows read, skipped by reason, truncation, packing efficiency, tokenising
throughput) and fills the cache, so a large set can be prepared before training. Example, the offline set with the
tiny tokenizer, uncached so that the throughput is measured:

    python -m pard_train.data data_recipes/self_instruct/self_instruct.jsonl --tiny --max-length 256 --no-cache
"""

from __future__ import annotations

import argparse
import json
import sys

from pard_train.config import DataConfig, LossOn, Truncation
from pard_train.data.dataset import build_data
from pard_train.errors import PardTrainError


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="pard_train.data", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="Hugging Face id or directory of the model's tokenizer")
    source.add_argument("--tiny", action="store_true", help="the tiny preset's BPE tokenizer, trained on the files")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--loss-on", default="assistant", choices=[v.value for v in LossOn])
    parser.add_argument("--truncation", default="truncate", choices=[v.value for v in Truncation])
    parser.add_argument("--chat-template", default=None)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--no-pack", action="store_true")
    parser.add_argument("--max-bad-fraction", type=float, default=0.1)
    parser.add_argument("--json", action="store_true", help="also print the stats as JSON")
    args = parser.parse_args(argv)
    try:  # a user mistake (a setting, a file) is one line and exit 2, as argparse's own errors are
        return _run(args)
    except PardTrainError as error:
        print(f"pard_train.data: error: {error}", file=sys.stderr)
        sys.exit(2)


def _run(args) -> dict:
    config = DataConfig(
        train_files=args.files,
        max_length=args.max_length,
        loss_on=LossOn(args.loss_on),
        truncation=Truncation(args.truncation),
        chat_template=args.chat_template,
        num_proc=args.num_proc,
        cache_dir=args.cache_dir,
        cache=not args.no_cache,
        pack=not args.no_pack,
        max_bad_fraction=args.max_bad_fraction,
    )
    stats = build_data(config, _tokenizer(args)).stats
    if args.json:
        print(json.dumps(stats, indent=1))
    return stats


def _tokenizer(args):
    if args.tiny:
        from pard_train.data.dataset import expand_files
        from pard_train.testing.tiny import build_tiny_tokenizer

        files = expand_files(args.files)
        return build_tiny_tokenizer(p.read_text(encoding="utf-8", errors="replace") for p in files)
    from pard_train.model import load_tokenizer

    return load_tokenizer(args.tokenizer)


if __name__ == "__main__":
    main()
