"""python -m pard_train.derive ...: the documented command, kept as a thin entry point (application layer);
its code is :mod:`pard_train.modelio.derive`."""

from pard_train.modelio.derive import main

if __name__ == "__main__":
    main()
