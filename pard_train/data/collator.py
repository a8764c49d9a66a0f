"""Turn packed rows into PARD layout batches. Only O(T) vectors are built here; masks are made where attention runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pard_train.core.layout import DropTokenSchedule, PardBatch, build_row, collate_rows
from pard_train.data.packing import PackedRow


@dataclass
class PardCollator:
    mask_token_id: int
    num_depths: int
    pad_token_id: int
    drop_tokens: DropTokenSchedule | None = None
    seed: int = 0
    pad_to_multiple_of: int = 1
    epoch: int = 0
    """Set by the trainer each epoch so that drop-token layouts differ between epochs."""

    def __call__(self, items: list[tuple[int, PackedRow]]) -> PardBatch:
        rows = []
        for index, row in items:
            # One generator per (seed, epoch, sample): layouts do not depend on batching, ranks or resumption.
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
            rows.append(
                build_row(
                    torch.tensor(row.input_ids),
                    self.mask_token_id,
                    self.num_depths,
                    document=torch.tensor(row.document),
                    supervised=torch.tensor(row.supervised),
                    drop_tokens=self.drop_tokens,
                    generator=generator,
                )
            )
        return collate_rows(rows, self.pad_token_id, self.pad_to_multiple_of)
