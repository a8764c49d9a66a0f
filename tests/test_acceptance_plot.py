"""before_after.png reads on its own: a title naming the target and K, labelled axes with units, overall AL in the
legend, per-position bars before and after, and vLLM's tokens/s with the speed-up and lossless check when served."""

from __future__ import annotations

import pytest

import pard_train.evaluate.report
from pard_train.training.acceptance_plot import plot_before_after

ROWS = {
    "gsm8k": {"before": 2.0, "after": 2.5, "after_vllm": 2.5},
    "all": {
        "before": 2.0,
        "after": 2.25,
        "after_vllm": 2.25,
        "before_by_position": [1.0, 0.05, 0.15, None],
        "after_by_position": [0.9, 0.35, 0.19, 0.07],
    },
}
SERVED = {
    "target": {"median": 15.0, "min": 14.0, "max": 16.0},
    "pard": {"median": 21.0, "min": 20.0, "max": 23.0},
    "speedup": 1.4,
    "lossless": True,
}


@pytest.fixture
def figure(monkeypatch, tmp_path):
    """The figure as it would be saved."""
    saved = []
    monkeypatch.setattr(pard_train.evaluate.report, "save_png", lambda fig, path: saved.append((fig, path)))

    def draw(rows, served):
        plot_before_after(rows, 4, tmp_path / "p.png", "PARD draft (K=4) for smollm2: before and after", served)
        ((fig, path),) = saved
        assert path == tmp_path / "p.png"
        return fig

    return draw


def test_every_panel_is_labelled_and_the_legend_holds_each_al(figure):
    fig = figure(ROWS, SERVED)
    lengths, positions, speed = fig.axes
    assert "K=4" in fig._suptitle.get_text() and "smollm2" in fig._suptitle.get_text()
    legend = [t.get_text() for t in lengths.get_legend().get_texts()]
    assert legend == ["before training: AL 2.00", "after training (harness): AL 2.25", "after, served by vLLM: AL 2.25"]
    assert "tokens per target forward" in lengths.get_ylabel()
    assert [tick.get_text() for tick in lengths.get_xticklabels()] == ["gsm8k", "all"]
    assert positions.get_xlabel() == "draft position" and "(%)" in positions.get_ylabel()
    heights = [[round(bar.get_height()) for bar in container] for container in positions.containers[:2]]
    assert heights == [[100, 5, 15, 0], [90, 35, 19, 7]]
    labels = [t.get_text() for t in positions.texts]
    assert "–" in labels and "35%" in labels  # a position never reached is a dash, not 0%
    assert speed.get_title() == "Served by vLLM: 1.40×, lossless" and "tokens per second" in speed.get_ylabel()
    assert [bar.get_height() for bar in speed.patches] == [15.0, 21.0]


def test_without_vllm_there_are_two_panels_and_no_vllm_bars(figure):
    rows = {name: {k: v for k, v in row.items() if k != "after_vllm"} for name, row in ROWS.items()}
    fig = figure(rows, None)
    assert len(fig.axes) == 2
    assert len(fig.axes[0].get_legend().get_texts()) == 2
