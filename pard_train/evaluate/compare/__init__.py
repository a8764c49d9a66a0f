"""Several evaluation runs side by side, as one Markdown table (AL and speed-up per benchmark and mode); a sweep
report contributes one column per cell (target, K, thinking). The command, ``python -m pard_train.evaluate.compare
RUN_DIR...``, is this package's ``__main__``.
"""

from __future__ import annotations

from pard_train.evaluate.eval_report import EvalReport
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
