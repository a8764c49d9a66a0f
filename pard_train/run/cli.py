"""Run a Hydra entry point so that every user mistake is one line on stderr and exit code 2.

Hydra prints composition errors over several lines (an unknown preset lists the search path; a wrongly typed value
adds the reference and object types and a hint about HYDRA_FULL_ERROR) and exits with 1. With HYDRA_FULL_ERROR set,
Hydra lets them propagate instead, so one handler turns them, and every :class:`PardTrainError` from the job, into a
line that names the key or the preset. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pard_train.base.errors import PardTrainError


def run_hydra(main: Callable[[], None], prog: str) -> None:
    """Call a ``@hydra.main`` function; report a user mistake as ``PROG: error: ...`` and exit 2."""
    from hydra.errors import CompactHydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let composition errors reach the handler below
    try:
        main()
    except PardTrainError as error:
        _fail(prog, str(error))
    except MissingConfigException as error:
        _fail(prog, _missing_config(error))
    except (CompactHydraException, OmegaConfBaseException) as error:
        _fail(prog, _composition(error))
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one during it: no traceback, the shell's code
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


@contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Inside the job: a :class:`PardTrainError` becomes one line and exit 2 (Hydra would log it as a job failure
    with the overrides first)."""
    try:
        yield
    except PardTrainError as error:
        _fail(prog, str(error))


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _missing_config(error) -> str:
    """``+config=llama9_1b`` -> ``unknown preset 'llama9_1b' for +config=; presets: demo, ...``."""
    missing = error.missing_cfg_file or ""
    group, _, name = missing.rpartition("/")
    if group and error.options:
        return f"unknown preset {name!r} for +{group}=; presets: {', '.join(sorted(error.options))}"
    return str(error).splitlines()[0]


def _composition(error) -> str:
    """``train.lr=fast`` -> ``train.lr: Value 'fast' of type 'str' could not be converted to Float``."""
    cause = error.__cause__ if error.__cause__ is not None else error
    key = getattr(cause, "full_key", None)
    message = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
    if key:
        return f"{key}: {message}"
    override = getattr(error, "override", None)
    first = str(error).strip().splitlines()[0]
    if override and "=" in override and any(mark in override for mark in "'\""):
        # A quote inside a value is Hydra override syntax: it parses only inside a quoted string, and the shell must
        # pass that string's quotes on (inside double quotes, escape what bash would expand).
        key, _, value = override.partition("=")
        quote = '"' if "'" in value else "'"
        quoted = f"{key}={quote}{value}{quote}"
        for special in ("\\", '"', "$", "`"):
            quoted = quoted.replace(special, "\\" + special)
        return (
            f"{override}: Hydra cannot parse a quote inside an unquoted value; quote the value, in the shell: "
            f'"{quoted}" ({first})'
        )
    return f"{override}: {first}" if override else first
