"""SIGTERM/SIGUSR1/SIGUSR2 (SLURM preemption, the time limit's warning, ``scancel --signal``, submitit's preemption
signal) and Ctrl-C (SIGINT) become a request to save and stop. A second Ctrl-C aborts at once, without saving
(KeyboardInterrupt, reported by the entry point in one line). A SIGINT the process inherited ignored (``nohup``, a
background job) stays ignored.

The handler only sets a flag; the trainer agrees on it across ranks in the all-reduce it already does each step, so
every rank stops after the same step and saves the same checkpoint. The previous handlers are restored on exit.

Under submitit (``hydra/launcher=slurm``) the job's preemption signal, USR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says
otherwise, is bound to submitit's handler, which requeues the job and exits at once: taken over here, the trainer
would save and the job would end as COMPLETED without being requeued; left to submitit, the job would be requeued
without the save. So the signal is recorded like the others and, once the checkpoint is saved, submitit's handler is
called as it would have been: it requeues the job and exits (the job is not reported COMPLETED).
"""

from __future__ import annotations

import os
import signal


def _submitit_signal() -> signal.Signals:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, "SIG" + name.removeprefix("SIG"), signal.SIGUSR2)


def _chainable(handler) -> bool:
    """A handler someone else installed (submitit's), not Python's or the OS's default or an ignore."""
    return callable(handler) and handler is not signal.default_int_handler


class StopSignals:
    """Record SIGTERM/SIGUSR1/SIGUSR2 so the loop can save and exit cleanly; on a clean exit after one arrived, chain
    to the handler that was installed before (submitit's requeue), so the launcher still does its part."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self.signals = tuple(
            dict.fromkeys((signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, _submitit_signal(), signal.SIGINT))
        )

    def __enter__(self) -> StopSignals:
        for sig in self.signals:
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # started under nohup or in the background: Ctrl-C stays ignored, as the launcher chose
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.received in (None, signal.SIGINT) or exc_type is not None:
            return  # nothing to hand on, the user stopped it, or the run failed (a requeue would repeat the failure)
        # Whatever stopped us (submitit's signal, or a SIGTERM from a preemption the site sends without it), the
        # checkpoint is saved: let submitit requeue the job. Elsewhere chain to the received signal's own handler.
        preempt = _submitit_signal()
        for sig in (preempt, self.received):
            handler = self._previous.get(sig)
            if _chainable(handler):
                handler(sig, None)
                return

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.received is not None:
                raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts)\n")
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None
