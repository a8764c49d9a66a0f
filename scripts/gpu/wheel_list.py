"""python scripts/gpu/wheel_list.py   (run by make wheelhouse with the project's venv)

Prints ``name==version`` for every distribution pard_train needs on the GPU image that the image lacks: the
dependency closure of what gpu-check imports (hydra-core, omegaconf, datasets, DeepSpeed, matplotlib) minus the
closure of what the image ships (torch, transformers, accelerate, pyarrow). Versions are the ones installed in this
venv, so the wheelhouse matches the tested pins.
"""

from __future__ import annotations

import re
from importlib import metadata

NEEDED = ["hydra-core", "omegaconf", "datasets", "deepspeed", "matplotlib", "tqdm", "filelock"]
ON_IMAGE = ["torch", "transformers", "accelerate", "pyarrow"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """Installed distributions reachable from ``roots`` through unconditional requirements (extras skipped)."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that this venv did not install
        seen[name] = dist.version
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return seen


if __name__ == "__main__":
    image = closure(ON_IMAGE)
    for name, version in sorted(closure(NEEDED).items()):
        if name not in image:
            print(f"{name}=={version}")
