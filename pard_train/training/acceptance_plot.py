"""``acceptance/before_after.png``: what training did to the draft, readable without the table beside it.

Panels: acceptance length per benchmark (before training, after it in the harness, and served by vLLM when it was),
with each one's overall AL in the legend; conditional acceptance per draft position, before and after, in percent;
and, when vLLM served the draft, its tokens/s for the target alone and with the draft (median and range of the
interleaved repeats), with the speed-up and the lossless check in the panel's title.
"""

from __future__ import annotations

from pathlib import Path

LABELS = {"before": "before training", "after": "after training (harness)", "after_vllm": "after, served by vLLM"}


def plot_before_after(rows: dict, k: int, path: Path, title: str, served: dict | None = None) -> None:
    """``rows``: benchmark (and ``all``) -> AL ``before``/``after``/``after_vllm`` and ``*_by_position``; ``served``:
    vLLM's ``target``/``pard`` tokens/s (median, min, max), ``speedup`` and ``lossless``, or None."""
    import matplotlib

    from pard_train.evaluate.report import save_png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if served else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6), width_ratios=[1.6, 1, 0.8][:panels])
    _acceptance_lengths(axes[0], rows)
    _by_position(axes[1], rows["all"], k)
    if served:
        _tokens_per_second(axes[2], served)
    figure.suptitle(title, fontsize=12)
    figure.tight_layout()
    save_png(figure, path)


def _acceptance_lengths(axis, rows: dict) -> None:
    names = list(rows)
    keys = [key for key in LABELS if rows["all"].get(key) is not None]
    width = 0.8 / len(keys)
    for index, key in enumerate(keys):
        offset = (index - (len(keys) - 1) / 2) * width
        bars = axis.bar(
            [i + offset for i in range(len(names))],
            [rows[name][key] or 0 for name in names],
            width,
            label=f"{LABELS[key]}: AL {rows['all'][key]:.2f}",
        )
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylim(0, max(rows[name][key] or 0 for name in names for key in keys) * 1.35)
    axis.set_ylabel("acceptance length (tokens per target forward)")
    axis.set_title("Acceptance length per benchmark")
    axis.legend(loc="upper left", fontsize=8)


def _by_position(axis, overall: dict, k: int) -> None:
    positions = range(1, k + 1)
    for index, key in enumerate(("before", "after")):
        rates = overall[f"{key}_by_position"]  # None: no draft ever reached the position
        values = [100 * v if v is not None else 0 for v in rates]
        bars = axis.bar([p + (index - 0.5) * 0.4 for p in positions], values, 0.4, label=LABELS[key])
        axis.bar_label(bars, labels=["–" if v is None else f"{100 * v:.0f}%" for v in rates], fontsize=7)
    axis.set_xticks(list(positions))
    axis.set_ylim(0, 115)
    axis.set_xlabel("draft position")
    axis.set_ylabel("accepted, given the earlier positions were (%)")
    axis.set_title("Acceptance per draft position (all)")
    axis.legend(loc="upper right", fontsize=8)


def _tokens_per_second(axis, served: dict) -> None:
    labels, keys = ["target alone", "target + draft"], ["target", "pard"]
    medians = [served[key]["median"] for key in keys]
    below = [m - served[key]["min"] for m, key in zip(medians, keys)]
    above = [served[key]["max"] - m for m, key in zip(medians, keys)]
    bars = axis.bar(labels, medians, 0.6, yerr=[below, above], capsize=4, color=["tab:gray", "tab:green"])
    axis.bar_label(bars, fmt="%.1f", fontsize=8, label_type="center")
    axis.set_ylabel("tokens per second (median of repeats)")
    axis.set_ylim(0, max(served[key]["max"] for key in keys) * 1.2)
    lossless = "lossless" if served["lossless"] else "NOT lossless"
    axis.set_title(f"Served by vLLM: {served['speedup']:.2f}×, {lossless}")
