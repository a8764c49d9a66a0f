"""python -m pard_train.export ...: the documented command, kept as a thin entry point (application layer);
its code is :mod:`pard_train.publish.export`."""

import sys

from pard_train.publish.export import main

if __name__ == "__main__":
    sys.exit(main())
