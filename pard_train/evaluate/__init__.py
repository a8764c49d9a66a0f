"""Speculative decoding evaluation: acceptance length and speed of a draft (AR or PARD) with a target.

``python -m pard_train.evaluate`` runs the benchmarks (see ``__main__``); :func:`measure_acceptance` is the small
PARD-mode measurement for use during training; ``python -m pard_train.evaluate.compare`` puts runs side by side.

May import: base, core, data, modelio; testing (the tiny pair). ``__main__`` and ``compare.__main__`` are entry points.
"""

from __future__ import annotations


def measure_acceptance(*args, **kwargs) -> dict:
    """See :func:`pard_train.evaluate.runner.measure_acceptance` (imported lazily: importing the package is cheap)."""
    from pard_train.evaluate.runner import measure_acceptance as run

    return run(*args, **kwargs)


__all__ = ["measure_acceptance"]
