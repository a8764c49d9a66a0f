"""Training data: sources and formats, chat templates and loss masks, caching, packing, the PARD collator.

May import: base, core (the layout). ``__main__`` (``python -m pard_train.data``) is an entry point.
"""

from pard_train.data.collator import PardCollator
from pard_train.data.dataset import TrainingData, build_data
from pard_train.data.packing import PackedRow, length_grouped_order
from pard_train.data.sources import DataError

__all__ = [
    "DataError",
    "PackedRow",
    "PardCollator",
    "TrainingData",
    "build_data",
    "length_grouped_order",
]
