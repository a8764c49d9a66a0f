"""Hydra multirun (``-m pard.num_draft_tokens=2,3``) gives each job its own run directory.

Without this every job of a sweep would train into the same ``<output_root>/<name>``: the second job would meet the
first one's run (refused, or worse with the same identity). Each job goes to ``<name>/<its swept overrides>``, e.g.
``runs/tiny/pard.num_draft_tokens=2``: the job's values of the keys the command line sweeps (all its overrides when
the command line is not at hand, as under a SLURM launcher), minus those that name places (paths, run.*, the
preset), or ``<name>/job<N>`` when nothing is left. An explicit ``run.dir``, or a ``run.name`` given on the command
line (``run.name='lr${train.lr}'``), is kept as given.
"""

from __future__ import annotations

import re
import sys

from pard_train.base.config import RunConfig

_PLACE_KEYS = ("run.", "+config", "config", "hydra.")


def _describes_the_job(override: str) -> bool:
    key, _, value = override.partition("=")
    return not key.lstrip("+~").startswith(_PLACE_KEYS) and "/" not in value


def job_dir_name(overrides: list[str], job_number: int) -> str:
    """A directory name for one job of a sweep: its distinguishing overrides, or ``job<N>``."""
    kept = sorted(o.lstrip("+~") for o in overrides if _describes_the_job(o))
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(kept))[:120]
    return name or f"job{job_number}"


def swept_keys(argv: list[str]) -> set[str] | None:
    """Keys the command line sweeps (``k=a,b``, ``k=range(...)``), or None when it cannot be parsed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # not Hydra's command line (a launcher's own process)
        return None
    return {override.get_key_element().lstrip("+~") for override in parsed if override.is_sweep_override()} or None


def job_run_name(run: RunConfig) -> str:
    """``run.name`` for this job: unchanged outside a multirun or with ``run.dir`` set."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or run.dir:
        return run.name
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return run.name
    overrides = list(hydra.overrides.task)
    if any(o.partition("=")[0].lstrip("+~") == "run.name" for o in overrides):
        return run.name  # named on the command line (run.name='lr${train.lr}'): the user chose each job's directory
    swept = swept_keys(sys.argv[1:])
    if swept is not None:
        overrides = [o for o in overrides if o.partition("=")[0].lstrip("+~") in swept]
    return f"{run.name}/{job_dir_name(overrides, hydra.job.num)}"
