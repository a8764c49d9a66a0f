"""Write model directories atomically: a directory counts only once it has been renamed into place."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_pretrained_atomically(model, tokenizer, directory: str | Path) -> Path:
    """``save_pretrained`` into a sibling temp directory, then rename: a crash never leaves a half checkpoint."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory
