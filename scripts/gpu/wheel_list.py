"""python scripts/gpu/wheel_list.py [--write | --check]   (make wheelhouse runs it with the project's venv)

What the wheelhouse carries to the bare GPU image: every distribution that the GPU check imports, with the
distributions those require, that the image does not have (scripts/gpu/image_packages.txt, the image's real list).
The walk stops at a distribution the image has: the image's packages are its own and consistent (we never replace
them). Requirements are read from this venv's installed metadata, markers evaluated for the image (CPython 3.12,
Linux x86_64), extras only where a requirement asks for them; versions are the ones installed here (the tested pins).

``--write`` rewrites scripts/gpu/wheelhouse.txt (committed, read by scripts/gpu/wheelhouse.sh); ``--check`` exits 1
when that file misses a needed distribution or carries one the image has (tests/test_wheelhouse.py runs it).
Lazily imported optional backends (wandb for ``tracking.backend=wandb``, submitit for SLURM) are not carried.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
IMAGE_LIST = HERE / "image_packages.txt"
WHEEL_LIST = HERE / "wheelhouse.txt"
# Sources of everything the check runs: the product, the check and the benchmarks it starts.
SOURCES = [REPO / "pard_train", HERE, REPO / "scripts" / "bench"]
# Imported only on request, never by the check: not carried.
OPTIONAL = {"wandb": "tracking.backend=wandb", "submitit": "SLURM launcher", "vllm": "data regeneration"}
# The image list names xxhash, yet the same notes say the image lacks it: carried (0.2 MiB) so datasets imports
# either way; on an image that has it, ours shadows it for the check's processes only (PYTHONPATH).
CARRIED_ANYWAY = {"xxhash"}
# The image is CPython 3.12.3 on Linux x86_64: markers are evaluated there, not for this venv's Python.
IMAGE_ENVIRONMENT = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_names(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def image_distributions() -> set[str]:
    return {canonical(name) for name in read_names(IMAGE_LIST)}


def listed_wheels() -> dict[str, str]:
    pins = (line.split("==") for line in read_names(WHEEL_LIST))
    return {canonical(name): version for name, version in pins}


def imported_distributions(sources: list[Path] = SOURCES) -> set[str]:
    """Distributions the code under ``sources`` imports by name (top-level and lazy ``import`` statements alike),
    read from the source with ``ast``: what the check can import, not what this venv's newer libraries import
    internally (those are the image's business)."""
    local = {path.stem for folder in sources for path in folder.rglob("*.py")} | {"pard_train"}
    names: set[str] = set()
    for folder in sources:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".", 1)[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".", 1)[0])
    names -= set(sys.stdlib_module_names) | local | set(OPTIONAL)
    owners = metadata.packages_distributions()
    unknown = sorted(name for name in names if name not in owners)
    if unknown:
        raise LookupError(f"imported but not installed here: {', '.join(unknown)}")
    return {canonical(dist) for name in names for dist in owners[name]}


def needed(roots: set[str], image: set[str]) -> tuple[dict[str, str], set[str]]:
    """Distributions reachable from ``roots`` that the image lacks, ``{name: installed version}``, walking
    requirements (markers for the image) and stopping at the image's own; and those needed but not installed here."""
    found: dict[str, str] = {}
    absent: set[str] = set()
    todo = [(name, frozenset()) for name in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if name in image or (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            absent.add(name)
            continue
        found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            wanted = {""} | set(extras)
            if requirement.marker and not any(
                requirement.marker.evaluate({**IMAGE_ENVIRONMENT, "extra": extra}) for extra in wanted
            ):
                continue
            todo.append((canonical(requirement.name), frozenset(requirement.extras)))
    return found, absent


def problems(required: dict[str, str], absent: set[str], listed: dict[str, str], image: set[str]) -> list[str]:
    """Why the wheel list would not work on the image (empty when it would)."""
    found = [
        f"{name}: needed, not on the image, not in {WHEEL_LIST.name}" for name in sorted(set(required) - set(listed))
    ]
    found += [f"{name}: needed for the image, not installed here to read its requirements" for name in sorted(absent)]
    found += [f"{name}: on the image, must not be carried" for name in sorted(set(listed) & image - CARRIED_ANYWAY)]
    found += [
        f"{name}=={listed[name]}: this venv has {required[name]}"
        for name in sorted(set(listed) & set(required))
        if listed[name] != required[name]
    ]
    return found


def compute() -> dict[str, str]:
    image = image_distributions()
    required, absent = needed(imported_distributions(), image)
    for name in CARRIED_ANYWAY:
        required[name] = metadata.version(name)
    if absent:
        sys.exit(f"wheel_list: needed but not installed here: {', '.join(sorted(absent))}")
    return dict(sorted(required.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"rewrite {WHEEL_LIST.name}")
    action.add_argument("--check", action="store_true", help=f"exit 1 unless {WHEEL_LIST.name} is right")
    args = parser.parse_args()
    if args.check:
        image = image_distributions()
        required, absent = needed(imported_distributions(), image)
        found = problems(required, absent, listed_wheels(), image)
        print("\n".join(found) or f"{WHEEL_LIST.name}: complete, nothing the image has", file=sys.stderr)
        return 1 if found else 0
    required = compute()
    text = "".join(f"{name}=={version}\n" for name, version in required.items())
    if args.write:
        header = (
            "# Written by python scripts/gpu/wheel_list.py --write: what the GPU check needs that the image lacks.\n"
        )
        WHEEL_LIST.write_text(header + text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
