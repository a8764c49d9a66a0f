"""python -m pard_train.derive SOURCE OUTPUT KEEP — a draft derived from SOURCE by keeping some of its decoder layers.

KEEP is a count N (N layers evenly spaced over the stack, the first and the last included) or layer indices
(``0,9,19,29``; negative ones count from the end). Derives once (a matching OUTPUT is reused) and prints OUTPUT. The
derivation itself, and why the count rule keeps the first and last layer, is :mod:`pard_train.modelio.derive`.
"""

from __future__ import annotations

import sys

from pard_train.base.errors import PardTrainError
from pard_train.modelio.derive import ensure_derived

USAGE = "usage: python -m pard_train.derive SOURCE OUTPUT KEEP   (KEEP: a count N, or indices 0,9,19,29)"


def parse_keep(text: str) -> int | list[int]:
    """``"4"`` -> 4 (a count); ``"0,9,-1"`` -> [0, 9, -1] (indices)."""
    parts = [part.strip() for part in text.strip("[]").split(",") if part.strip()]
    if len(parts) == 1 and "," not in text:
        return int(parts[0])
    return [int(part) for part in parts]


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(USAGE)
    try:
        print(ensure_derived(sys.argv[1], sys.argv[2], parse_keep(sys.argv[3])))
    except (PardTrainError, ValueError) as error:  # a missing model, a bad KEEP: one line
        print(f"pard_train.derive: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
