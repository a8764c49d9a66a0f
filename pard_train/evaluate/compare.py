"""Several evaluation runs side by side, as one Markdown table (AL and speed-up per benchmark and mode); a sweep
report contributes one column per cell (target, K, thinking).

python -m pard_train.evaluate.compare runs/evaluate/draft_a runs/evaluate/draft_b [...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from pard_train.evaluate.eval_report import EvalReport, load_report
from pard_train.evaluate.report import MODE_ORDER, fmt
from pard_train.evaluate.sweep_report import cell_label


def compare_table(reports: dict[str, EvalReport]) -> str:
    """Rows: benchmark x mode; for each run, a column ``AL (speed-up)``. Missing cells show a dash."""
    runs = list(reports)
    rows: list[tuple[str, str]] = []
    for report in reports.values():
        for name, entry in report.sections("**all**"):
            for mode in entry:
                if (name, mode) not in rows:
                    rows.append((name, mode))
    order = {name: i for i, name in enumerate(dict.fromkeys(n for n, _ in rows))}
    rows.sort(key=lambda r: (order[r[0]], MODE_ORDER.index(r[1]) if r[1] in MODE_ORDER else len(MODE_ORDER)))
    lines = [
        "| benchmark | mode | " + " | ".join(f"{run}: AL (speed-up)" for run in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    for name, mode in rows:
        cells = []
        for report in reports.values():
            summary = report.summary(mode, None if name == "**all**" else name)
            cells.append(
                "–" if summary is None else f"{fmt(summary['acceptance_length'])} ({fmt(summary.get('speedup'))}x)"
            )
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def expand_sweeps(reports: dict[str, dict]) -> dict[str, EvalReport]:
    """Typed evaluation reports from JSON; a sweep report becomes one column per cell (target, K, thinking), named
    ``run[cell]``."""

    out = {}
    for name, report in reports.items():
        if report.get("kind") == "sweep":
            out.update(
                {f"{name}[{cell_label(cell)}]": EvalReport.from_json(cell["report"]) for cell in report["cells"]}
            )
        else:
            out[name] = EvalReport.from_json(report)
    return out


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
