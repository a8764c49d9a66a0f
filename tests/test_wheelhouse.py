"""The wheelhouse carries exactly what the GPU check imports that the bare image lacks (scripts/gpu/wheel_list.py):
read from the image's real package list, walked through installed requirement metadata; a distribution needed but
neither on the image nor in scripts/gpu/wheelhouse.txt fails here, before a GPU slot is spent finding out."""

from __future__ import annotations

import subprocess
import sys

import pytest
from launch import REPO

sys.path.insert(0, str(REPO / "scripts" / "gpu"))
import wheel_list  # noqa: E402


@pytest.fixture(scope="module")
def walked():
    image = wheel_list.image_distributions()
    required, absent = wheel_list.needed(wheel_list.imported_distributions(), image)
    return image, required, absent


def test_committed_wheel_list_is_complete_and_carries_nothing_the_image_has(walked):
    image, required, absent = walked
    listed = wheel_list.listed_wheels()
    assert wheel_list.problems(required, absent, listed, image) == []
    # DeepSpeed's config machinery imports pydantic, which the image lacks (the bare image's first failure).
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-inspection"} <= set(listed)
    assert {"deepspeed", "datasets", "hydra-core", "omegaconf", "antlr4-python3-runtime"} <= set(listed)
    for on_image in ("matplotlib", "pandas", "pillow", "python-dateutil", "torch", "transformers", "pyarrow"):
        assert on_image in image and on_image not in listed


def test_a_needed_distribution_missing_from_both_lists_is_reported(walked):
    image, required, absent = walked
    listed = wheel_list.listed_wheels()
    del listed["pydantic-core"]  # as if the wheel list forgot one of pydantic's requirements
    assert wheel_list.problems(required, absent, listed, image) == [
        "pydantic-core: needed, not on the image, not in wheelhouse.txt"
    ]
    # Carrying a distribution the image has (it would shadow the image's own) is reported too.
    listed = {**wheel_list.listed_wheels(), "pandas": "2.0.0"}
    assert wheel_list.problems(required, absent, listed, image) == ["pandas: on the image, must not be carried"]


def test_the_walk_stops_at_the_image_and_reads_requirements(walked):
    image, required, _ = walked
    # deepspeed -> pydantic -> pydantic-core: reached through requirement metadata, not imported by us directly.
    assert "pydantic-core" in required and "pydantic-core" not in wheel_list.imported_distributions()
    # Without the image list, the walk would carry the image's own packages (what the old closure got wrong).
    everything, _ = wheel_list.needed(wheel_list.imported_distributions(), set())
    assert {"torch", "numpy", "pyarrow"} <= set(everything)
    assert not set(required) & (image - wheel_list.CARRIED_ANYWAY)


def test_check_flag_passes_on_the_committed_list():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu" / "wheel_list.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
