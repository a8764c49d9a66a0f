"""python -m pard_train.gguf ...: the documented command, kept as a thin entry point (application layer);
its code is :mod:`pard_train.modelio.gguf`."""

from pard_train.modelio.gguf import main

if __name__ == "__main__":
    main()
