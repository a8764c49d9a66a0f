"""python -m pard_train.data FILE... [--tokenizer PATH | --tiny] — tokenise, pack and report a data set.

Logs what the trainer would log (rows read, skipped by reason, truncation, packing efficiency, tokenising
throughput) and fills the cache, so a large set can be prepared before training. Example, the offline set with the
tiny tokenizer, uncached so that the throughput is measured:

    python -m pard_train.data data_recipes/self_instruct/self_instruct.jsonl --tiny --max-length 256 --no-cache
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from enum import Enum

from pard_train.base.config import DataConfig, LossOn, Truncation
from pard_train.base.errors import PardTrainError
from pard_train.data.dataset import build_data
from pard_train.run.logs import setup_logging


def _default(name: str):
    """The trainer's default for ``data.<name>``: the CLI prepares what training would (and the cache it would hit)."""
    default = next(field.default for field in fields(DataConfig) if field.name == name)
    return default.value if isinstance(default, Enum) else default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pard_train.data", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="Hugging Face id or directory of the model's tokenizer")
    source.add_argument("--tiny", action="store_true", help="the tiny preset's BPE tokenizer, trained on the files")
    parser.add_argument("--max-length", type=int, default=_default("max_length"))
    parser.add_argument("--loss-on", default=_default("loss_on"), choices=[v.value for v in LossOn])
    parser.add_argument("--truncation", default=_default("truncation"), choices=[v.value for v in Truncation])
    parser.add_argument("--chat-template", default=_default("chat_template"))
    parser.add_argument("--num-proc", type=int, default=_default("num_proc"))
    parser.add_argument("--cache-dir", default=None, help="default: the package's cache directory")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--no-pack", action="store_true")
    parser.add_argument("--max-bad-fraction", type=float, default=_default("max_bad_fraction"))
    parser.add_argument("--json", action="store_true", help="also print the stats as JSON")
    return parser


def data_config(args) -> DataConfig:
    return DataConfig(
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


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)  # argparse's own errors exit 2
    setup_logging()
    try:  # a user mistake (a setting, a file) is one line and exit 2, as in every CLI of the package
        return _run(args)
    except (PardTrainError, OSError) as error:
        print(f"pard_train.data: error: {error}", file=sys.stderr)
        sys.exit(2)


def _run(args) -> dict:
    stats = build_data(data_config(args), _tokenizer(args)).stats
    if args.json:
        print(json.dumps(stats, indent=1))  # the command's result, not a log line
    return stats


def _tokenizer(args):
    if args.tiny:
        from pard_train.data.dataset import expand_files
        from pard_train.testing.tiny import build_tiny_tokenizer

        files = expand_files(args.files)
        return build_tiny_tokenizer(p.read_text(encoding="utf-8", errors="replace") for p in files)
    from pard_train.modelio.model import load_tokenizer

    return load_tokenizer(args.tokenizer)


if __name__ == "__main__":
    main()
