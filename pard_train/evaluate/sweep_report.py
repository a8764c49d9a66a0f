"""Write a sweep report (:func:`pard_train.evaluate.sweep.run_sweep`): ``report.json``, ``report.md`` (AL matrix,
per-position acceptance per target, thinking off/on, K sweep with the recommended K), ``al_heatmap.png`` (targets x
benchmarks) and, for a K sweep, ``k_sweep.png``; each cell's own report under ``cells/<label>/``."""

from __future__ import annotations

import json
from pathlib import Path

from pard_train.base.atomic import atomic_write_bytes
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.report import fmt, save_png, write_report


def _name(target: str) -> str:
    return Path(target).name or target


def cell_label(cell: dict) -> str:
    return f"{_name(cell['target'])} K={cell['k']}" + (" thinking" if cell["thinking"] else "")


def _benchmarks(sweep: dict) -> list[str]:
    return list(EvalReport.from_json(sweep["cells"][0]["report"]).benchmarks)


def pard_al(report: dict, benchmark: str | None = None) -> float | None:
    """PARD mode's AL in one cell's evaluation report (its JSON), on one benchmark or (None) over all."""
    return EvalReport.from_json(report).acceptance_length("pard", benchmark)


def al_matrix(sweep: dict) -> tuple[list[str], list[str], list[list[float | None]]]:
    """``(row labels, benchmarks + 'all', AL)``: one row per cell (target, K, thinking), PARD mode."""
    columns = [*_benchmarks(sweep), "all"]
    rows = [cell_label(c) for c in sweep["cells"]]
    values = [[pard_al(c["report"], None if b == "all" else b) for b in columns] for c in sweep["cells"]]
    return rows, columns, values


def markdown_sweep(sweep: dict) -> str:
    config, env = sweep["config"], sweep["environment"]
    trained = sweep.get("trained_num_draft_tokens")
    lines = [
        "# PARD draft sweep",
        "",
        f"- draft: `{config['draft']}` (trained K = {trained or 'not recorded'}); max new tokens "
        f"{config['max_new_tokens']}; prompts per benchmark: {config['num_prompts'] or 'all'}; greedy verification",
        f"- {env.get('gpu', env['device'])}, {env['dtype']}, torch {env['torch']}, transformers {env['transformers']}",
        "- AL = tokens per target verification forward (vLLM: 1 + accepted/drafts), PARD mode.",
        "",
        "## Acceptance length (rows: target, K, thinking; columns: benchmarks)",
        "",
    ]
    rows, columns, values = al_matrix(sweep)
    lines += ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(fmt(v) for v in vals) + " |" for row, vals in zip(rows, values, strict=True)]
    lines += ["", "## Conditional acceptance by draft position (all benchmarks)", ""]
    width = max(c["k"] for c in sweep["cells"])
    lines += ["| | " + " | ".join(str(i + 1) for i in range(width)) + " |", "|---|" + "---|" * width]
    for cell in sweep["cells"]:
        rates = (EvalReport.from_json(cell["report"]).summary("pard") or {}).get("conditional_acceptance", [])
        lines.append(
            f"| {cell_label(cell)} | " + " | ".join(fmt(r) for r in [*rates, *[None] * (width - len(rates))]) + " |"
        )
    thinking = [c for c in sweep["cells"] if c["thinking"]]
    if thinking:
        lines += ["", "## Thinking off / on (AL, all benchmarks)", "", "| target | K | off | on |", "|---|---|---|---|"]
        for on in thinking:
            off = next(
                c for c in sweep["cells"] if (c["target"], c["k"], c["thinking"]) == (on["target"], on["k"], False)
            )
            lines.append(
                f"| {_name(on['target'])} | {on['k']} | {fmt(pard_al(off['report']))} | {fmt(pard_al(on['report']))} |"
            )
    if "k_sweep" in sweep:
        lines += ["", "## K sweep", "", sweep["k_sweep"]["formula"], ""]
        for target, entry in sweep["k_sweep"]["targets"].items():
            lines += [
                f"Target `{target}`: **recommended K = {entry['recommended_k']}**",
                "",
                "| K | AL | draft tokens/forward | t_draft (ms) | t_target(K+1) (ms) | t_target(1) (ms) "
                "| expected speed-up | measured speed-up (wall) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for k, row in entry["per_k"].items():
                above = " (above trained K: warning)" if trained and int(k) > trained else ""
                lines.append(
                    f"| {k}{above} | {fmt(row['acceptance_length'])} | {row['draft_tokens_per_forward']} | "
                    f"{fmt(row['t_draft'] * 1e3)} | {fmt(row['t_verify'] * 1e3)} | {fmt(row['t_decode'] * 1e3)} | "
                    f"{fmt(row['expected_speedup'])}x | {fmt(row.get('measured_speedup'))}x |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_heatmap(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns, values = al_matrix(sweep)
    data = [[float("nan") if v is None else v for v in vals] for vals in values]
    figure, axis = plt.subplots(figsize=(1.8 + 1.3 * len(columns), 1.2 + 0.5 * len(rows)))
    image = axis.imshow(data, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(columns)), columns)
    axis.set_yticks(range(len(rows)), rows)
    low, high = image.get_clim()
    for i, vals in enumerate(values):
        for j, value in enumerate(vals):
            bright = value is not None and value > (low + high) / 2  # dark text on the light end of viridis
            axis.text(j, i, fmt(value), ha="center", va="center", color="black" if bright else "white", fontsize=8)
    figure.colorbar(image, ax=axis, label="acceptance length")
    axis.set_title("PARD acceptance length")
    figure.tight_layout()
    save_png(figure, path)


def plot_k_sweep(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (al_axis, speed_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    for target, entry in sweep["k_sweep"]["targets"].items():
        ks = [int(k) for k in entry["per_k"]]
        al_axis.plot(ks, [r["acceptance_length"] for r in entry["per_k"].values()], marker="o", label=_name(target))
        speed_axis.plot(ks, [r["expected_speedup"] for r in entry["per_k"].values()], marker="o", label=_name(target))
    al_axis.set(xlabel="K", ylabel="acceptance length", title="AL per K")
    speed_axis.set(xlabel="K", ylabel="expected speed-up", title="expected speed-up per K")
    speed_axis.legend(fontsize=7)
    figure.tight_layout()
    save_png(figure, path)


def write_cell(cell: dict, output_dir: str | Path) -> Path:
    """One cell's report into ``output_dir/cells/LABEL``: a sweep writes each as it finishes, and again at the end."""
    label = cell_label(cell).replace(" ", "_").replace("=", "")
    return write_report(EvalReport.from_json(cell["report"]), Path(output_dir) / "cells" / label)


def write_sweep_report(sweep: dict, output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for cell in sweep["cells"]:
        write_cell(cell, output_dir)
    atomic_write_bytes(output_dir / "report.json", (json.dumps(sweep, indent=2) + "\n").encode())
    atomic_write_bytes(output_dir / "report.md", markdown_sweep(sweep).encode())
    plot_heatmap(sweep, output_dir / "al_heatmap.png")
    if "k_sweep" in sweep:
        plot_k_sweep(sweep, output_dir / "k_sweep.png")
    return output_dir
