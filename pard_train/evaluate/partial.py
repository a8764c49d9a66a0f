"""The report as it grows: after each (benchmark, mode) finishes, ``report.partial.json`` in ``output_dir`` holds
every number measured so far, so a crash or Ctrl-C late in a long evaluation loses only the measurement in flight.

The file is an :class:`pard_train.evaluate.eval_report.EvalReport` over the finished parts only, with
``"partial": true`` and ``"done"`` (the finished ``{"benchmark", "mode"}`` pairs, in order). It has no ``wallclock``
section (that needs every repeat), so its tokens/s are the first repeat's. The final report.json replaces it: the
file is removed once report.json is written.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from pard_train.base.atomic import atomic_write_bytes
from pard_train.evaluate.eval_report import EvalReport
from pard_train.evaluate.sweep_report import write_cell

logger = logging.getLogger(__name__)

PARTIAL_NAME = "report.partial.json"


def partial_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / PARTIAL_NAME


class PartialReportWriter:
    """Called with each partial report; writes it atomically, so a reader sees the previous part or the next one.

    A write that fails (a full disk) is logged once as a warning and the measurement goes on: losing the
    safety copy must not cost the measurement it protects (the final report is printed if it cannot be written).
    """

    def __init__(self, output_dir: str | Path):
        self.path = partial_path(output_dir)
        self.failed = False
        self.written = False

    def __call__(self, report: EvalReport) -> None:
        if self.failed:
            return
        try:
            atomic_write_bytes(self.path, report.dumps().encode())
            self.written = True
        except OSError as error:
            self.failed = True
            logger.warning(f"WARNING: could not write {self.path} ({error.strerror or error}); measuring on without it")

    @contextmanager
    def pointed_at_on_failure(self):
        """A crash or Ctrl-C while measuring says where the finished parts are, before its own message."""
        try:
            yield
        except BaseException:
            if self.written:
                logger.warning(f"pard_train.evaluate: the parts measured so far are in {self.path}")  # to stderr
            raise

    def remove(self) -> None:
        """The final report is on disk: the partial one is stale."""
        self.path.unlink(missing_ok=True)


def partial_cell_writer(output_dir: str | Path):
    """For a sweep: write each finished cell's report into ``output_dir/cells/LABEL`` (where the final sweep report
    puts it too); a failed write is reported once and the sweep goes on, as with :class:`PartialReportWriter`."""

    failed = []

    def on_cell(cell: dict) -> None:
        if failed:
            return
        try:
            write_cell(cell, output_dir)
        except OSError as error:
            failed.append(error)
            logger.warning(
                f"WARNING: could not write a finished cell's report ({error.strerror or error}); measuring on"
            )

    return on_cell
