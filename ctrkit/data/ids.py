"""A batch's distinct ids, found once (in the loader's prefetch thread) for every embedding module.

Embedding lookups gather only the rows a batch touched; the backward pass then sums each distinct
row's gradient over the positions that used it. Knowing the sort order of the positions turns that
sum into a segment sum (one `embedding_bag` call, ~4x faster on CPU than `index_add`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class DistinctIds(NamedTuple):
    keys: torch.Tensor      # [U] sorted distinct values
    inverse: torch.Tensor   # [N] position of each input value in `keys`
    order: torch.Tensor     # [N] input positions sorted by value (grouped by distinct key)
    offsets: torch.Tensor   # [U + 1] start of each key's group in `order`


def distinct_ids(values: torch.Tensor) -> DistinctIds:
    """Distinct values of a 1-D int64 tensor with inverse map and grouping (one sort)."""
    sorted_values, order = torch.sort(values)
    keys, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    offsets = torch.zeros(keys.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    inverse = torch.empty_like(order)
    inverse[order] = torch.repeat_interleave(torch.arange(keys.numel()), counts)
    return DistinctIds(keys, inverse, order, offsets)
