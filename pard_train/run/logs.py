"""One logging set-up for every entry point: the package's messages one line each (``%(message)s``), from the main
process only: information on stdout, warnings on stderr.

Modules log through ``logging.getLogger(__name__)``; entry points call :func:`setup_logging` once (the Hydra ones
tell Hydra to leave the job's logging alone, ``hydra/job_logging: none``, and the set-up replaces the console handler
Hydra installs for its own messages). Progress bars (tqdm) are not log lines and stay.
Without the set-up (the package used as a library, or in tests) the messages go wherever the application's logging
sends them; pytest's ``caplog`` sees them.
"""

from __future__ import annotations

import logging
import os
import sys

PACKAGE = "pard_train"


def is_main_process(environ=None) -> bool:
    """Rank 0, as every launcher (torchrun, accelerate, deepspeed, the SLURM entrypoint) sets ``RANK``; a process
    started alone is rank 0. Read per record, so it needs no process group, and from ``os.environ`` as it is then
    (not a default bound at import: a library may have replaced the mapping since)."""
    return (os.environ if environ is None else environ).get("RANK", "0") == "0"


class MainProcessOnly(logging.Filter):
    """Drops the package's records on every rank but 0, unless logged with ``extra={"all_ranks": True}``; other
    libraries' records pass (their own loggers decide)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == PACKAGE or record.name.startswith(PACKAGE + ".")
        return not ours or getattr(record, "all_ranks", False) or is_main_process()


class _Console(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` (or ``sys.stderr``) is at the time (pytest replaces them):
    information to stdout, warnings and errors to stderr, where a user (and a script reading stdout) expects them."""

    def __init__(self, to_stderr: bool = False):
        self.to_stderr, self._warning = to_stderr, False
        super().__init__()

    def emit(self, record: logging.LogRecord) -> None:
        self._warning = record.levelno >= logging.WARNING
        super().emit(record)

    @property
    def stream(self):
        return sys.stderr if self.to_stderr or self._warning else sys.stdout

    @stream.setter
    def stream(self, value):
        pass


class NoGpuNotice(logging.Filter):
    """DeepSpeed warns at import, on every machine without a GPU, that it chose the CPU, before any of its code runs:
    nothing a user can act on, and the first line of every command's output. Dropped only when torch indeed sees no
    CUDA or ROCm device (with one visible, a failed detection is worth the warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Setting accelerator to CPU."):
            return True
        import torch  # imported already: DeepSpeed's detection ran on it

        return torch.cuda.is_available()


def setup_logging(level: int = logging.INFO, to_stderr: bool = False) -> None:
    """Send log records at ``level`` and above to stdout (scripts whose stdout is a table: stderr) as bare lines, the
    package's from rank 0 only. Plain console handlers already on the root logger (Hydra's, which would print every
    line again, on every rank) are replaced; other handlers (files, pytest's capture) stay. Idempotent: a second call
    (an entry point run twice in one process) adds no second handler. Call it before DeepSpeed is imported."""
    deepspeed = logging.getLogger("DeepSpeed")  # its logger, before its import: DeepSpeed keeps a logger's filters
    if not any(isinstance(f, NoGpuNotice) for f in deepspeed.filters):
        deepspeed.addFilter(NoGpuNotice())
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)
    if not any(isinstance(handler, _Console) for handler in root.handlers):
        handler = _Console(to_stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(MainProcessOnly())
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(PACKAGE).setLevel(level)
