"""python -m pard_train.evaluate.compare runs/evaluate/draft_a runs/evaluate/draft_b [...] — evaluation runs side by
side: prints one Markdown table of AL and speed-up per benchmark and mode (a sweep report gives a column per cell).

Each argument is a run's output directory or its ``report.json``; columns are named by the directory (by the full
path when two share a name). The table is :func:`pard_train.evaluate.compare.compare_table`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pard_train.evaluate.compare import compare_table, expand_sweeps
from pard_train.evaluate.eval_report import load_report


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m pard_train.evaluate.compare RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    try:
        reports = {Path(p).name if Path(p).suffix != ".json" else Path(p).parent.name: load_report(p) for p in paths}
    except FileNotFoundError as error:
        print(f"pard_train.evaluate.compare: error: {error}", file=sys.stderr)
        return 2
    if len(reports) < len(paths):  # two runs with the same folder name: label them by full path
        reports = {p: load_report(p) for p in paths}
    reports = expand_sweeps(reports)
    sys.stdout.write(compare_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
