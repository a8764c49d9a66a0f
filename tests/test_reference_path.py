"""The reference path that the GPU check measures ours against builds its mask as the reference's collator does: the
full layout's float32 (K*L)^2 mask, then gathered at the tokens drop-token kept. It must equal the attention rule on
the kept tokens, or the comparison would train something else."""

from __future__ import annotations

import sys

import pytest
import torch
from launch import REPO

from pard_train.core.layout import DropTokenSchedule, build_row, collate_rows

sys.path.insert(0, str(REPO / "scripts" / "bench"))
from _common import dense_additive_mask, reference_collator_mask  # noqa: E402


@pytest.mark.parametrize("num_depths", [2, 4, 8])
def test_gathered_full_layout_mask_equals_the_rule_on_the_kept_tokens(num_depths):
    generator = torch.Generator().manual_seed(num_depths)
    rows = [torch.randint(0, 90, (length,), generator=generator) for length in (40, 23)]
    built = [
        build_row(ids, 99, num_depths, drop_tokens=DropTokenSchedule(0.7, 0.2), generator=generator) for ids in rows
    ]
    batch = collate_rows(built, pad_token_id=0, pad_to_multiple_of=16)
    full_length = len(build_row(rows[0], 99, num_depths).input_ids)
    assert int((batch.document[0] >= 0).sum()) < full_length  # drop-token kept a strict subset
    mask = reference_collator_mask(rows, batch, 99, num_depths)
    width = batch.input_ids.shape[1]
    assert mask.dtype == torch.float32 and mask.shape == (2, 1, width, width)
    assert torch.equal(mask, dense_additive_mask(batch, torch.float32))
