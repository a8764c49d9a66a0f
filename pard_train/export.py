"""Export a trained PARD draft as a Hugging Face checkpoint that vLLM serves as a parallel draft without edits.

    python -m pard_train.export --checkpoint runs/NAME/final --output exports/NAME [--target TARGET_DIR]
        [--num-draft-tokens K] [--dtype bf16|fp32] [--al-table runs/eval/report.json]
        [--k-sweep runs/eval/ksweep/report.json] [--overwrite]
    python -m pard_train.export --check DRAFT_DIR [--target TARGET_DIR]   # serving preflight (exit 2: would fail)

The command line only: the export is :mod:`pard_train.publish.export_checkpoint` (and
:mod:`pard_train.publish.export`), the preflight :mod:`pard_train.publish.serving_check`. A user mistake is one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pard_train.base.errors import PardTrainError
from pard_train.publish.export import DTYPES
from pard_train.run.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pard_train.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", metavar="DRAFT", help="serving preflight: say what vLLM would do with DRAFT; exit 2 if it would fail"
    )
    parser.add_argument("--checkpoint", help="trained draft directory (e.g. runs/NAME/final)")
    parser.add_argument("--output", help="directory to create")
    parser.add_argument(
        "--target", help="target model directory: same tokenizer required; the draft is padded to its vocab_size"
    )
    parser.add_argument("--num-draft-tokens", type=int, help="trained K (default: the K the checkpoint records)")
    parser.add_argument("--mask-token-id", type=int, help="default: the mask token the checkpoint records")
    parser.add_argument("--base-model", help="the AR model the draft was trained from (default: from the recipe)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype on disk (default: the checkpoint's)")
    parser.add_argument("--al-table", type=Path, help="evaluation report.json or a Markdown table for the model card")
    parser.add_argument(
        "--k-sweep", type=Path, help="K-sweep report.json: its recommended K and command go in the card"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.check is None and (args.checkpoint is None or args.output is None):
        parser.error("give --checkpoint and --output to export, or --check DRAFT for the serving preflight")

    try:
        if args.check is not None:
            from pard_train.publish.serving_check import check_serving

            for line in check_serving(args.check, args.target):
                print(line)
            return 0
        from pard_train.publish.export_checkpoint import export_checkpoint

        export_checkpoint(
            args.checkpoint,
            args.output,
            target=args.target,
            num_draft_tokens=args.num_draft_tokens,
            mask_token_id=args.mask_token_id,
            base_model=args.base_model,
            dtype=args.dtype,
            al_table=args.al_table,
            k_sweep=args.k_sweep,
            overwrite=args.overwrite,
        )
        return 0
    except (PardTrainError, OSError) as error:
        print(f"pard_train.export: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
