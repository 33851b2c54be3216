"""Vocabularies: counting a feature's values over a stream of record batches, and picking ids.

`ValueCounter` keeps one feature's distinct values in order of first appearance with their counts,
merged across batches and files; its memory is the number of distinct values, never the number of
rows. `fit_vocab` turns the counts into a vocabulary: values seen at least `min_count` times (and
only the `max_size` most frequent, when set) get ids 2.. (most frequent first, ties in order of
first appearance); rarer ones share the out-of-vocabulary id 0; a missing value has id 1.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class ValueCounter:
    """Distinct values (first appearance first) and how often each was seen.

    A batch's distinct values and counts are buffered; when the buffer outgrows the merged values
    (and at least `merge_rows` entries), all are merged in one hash pass (`dictionary_encode` of the
    concatenation keeps first-appearance order), so each value is hashed O(log) times overall."""

    def __init__(self, merge_rows: int = 1 << 16) -> None:
        self.values: Optional[pa.Array] = None
        self.counts = np.zeros(0, np.int64)
        self._pending: List[Tuple[pa.Array, np.ndarray]] = []
        self._pending_len = 0
        self.merge_rows = merge_rows

    def add(self, col: pa.Array) -> None:
        """Count the values of one column of a batch (nulls are missing, not counted; a list
        column, a multi-hot field, counts each of its values)."""
        if pa.types.is_list(col.type):
            col = pc.list_flatten(col)
        d = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
        idx = d.indices.drop_null().to_numpy(zero_copy_only=False)
        counts = np.bincount(idx, minlength=len(d.dictionary)).astype(np.int64)
        self.add_counts(d.dictionary, counts)

    def add_counts(self, values: pa.Array, counts: np.ndarray) -> None:
        """Merge distinct `values` seen `counts` times (another file's counter, say)."""
        self._pending.append((values, counts))
        self._pending_len += len(values)
        if self._pending_len >= max(self.merge_rows, len(self.counts)):
            self._merge()

    def result(self) -> Tuple[pa.Array, np.ndarray]:
        """(distinct values in order of first appearance, their counts)."""
        self._merge()
        if self.values is None:
            return pa.array([], pa.string()), np.zeros(0, np.int64)
        return self.values, self.counts

    def _merge(self) -> None:
        if not self._pending:
            return
        parts = ([(self.values, self.counts)] if self.values is not None else []) + self._pending
        self._pending, self._pending_len = [], 0
        if len({v.type for v, _ in parts}) > 1:   # e.g. Parquet files typed differently
            parts = [(v.cast(pa.string()), c) for v, c in parts]
        d = pc.dictionary_encode(pa.concat_arrays([v for v, _ in parts]))
        counts = np.concatenate([c for _, c in parts])
        idx = d.indices.to_numpy(zero_copy_only=False)
        # (float64 sums are exact below 2**53 rows)
        merged = np.bincount(idx, weights=counts, minlength=len(d.dictionary))
        self.values, self.counts = d.dictionary, merged.astype(np.int64)


def fit_vocab(values: pa.Array, counts: np.ndarray, min_count: int,
              max_size: Optional[int] = None) -> Tuple[pa.Array, np.ndarray]:
    """(vocabulary values, their counts): id i + 2 is the i-th value (see the module doc)."""
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] >= min_count]
    if max_size is not None:
        order = order[:max_size]
    return values.take(pa.array(order, pa.int64())), counts[order]
