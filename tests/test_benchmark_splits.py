"""Benchmark splits: ``NAME:tune`` and ``NAME:report`` are the two halves of a built-in benchmark, disjoint, so
settings chosen on one are reported on the other."""

from __future__ import annotations

import pytest

from pard_train.base.errors import BenchmarkError
from pard_train.evaluate.benchmarks import BUILTIN, load_prompts


@pytest.mark.parametrize("name", BUILTIN)
def test_tune_and_report_are_the_two_disjoint_halves(name):
    _, whole = load_prompts(name)
    label, tune = load_prompts(f"{name}:tune")
    _, report = load_prompts(f"{name}:report")
    assert label == name  # reports keep the benchmark's name
    assert [p.turns for p in tune] + [p.turns for p in report] == [p.turns for p in whole]
    assert len(tune) == len(whole) // 2 and not {str(p.turns) for p in tune} & {str(p.turns) for p in report}
    assert [p.turns for p in load_prompts(f"{name}:report", 2)[1]] == [p.turns for p in report[:2]]


def test_an_unknown_split_is_refused():
    with pytest.raises(BenchmarkError, match="split must be one of tune, report"):
        load_prompts("gsm8k:test")
