"""Training data: read conversation files, render them with the chat template, pack them, collate PARD layouts."""

from pard_train.data.collator import PardCollator
from pard_train.data.dataset import PackedRow, build_packed_rows

__all__ = ["PackedRow", "PardCollator", "build_packed_rows"]
