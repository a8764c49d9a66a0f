"""SIGTERM/SIGUSR1 (SLURM preemption, the time limit's warning, ``scancel --signal``) become a request to save and stop.

The handler only sets a flag; the trainer agrees on it across ranks in the all-reduce it already does each step, so
every rank stops after the same step and saves the same checkpoint. The previous handlers are restored on exit.
"""

from __future__ import annotations

import signal


class StopSignals:
    """Record SIGTERM/SIGUSR1 (SLURM preemption, time limit, ``scancel``) so the loop can save and exit cleanly.

    The handler only sets a flag; the trainer agrees on it across ranks in the all-reduce it already does each step,
    so every rank stops after the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None
