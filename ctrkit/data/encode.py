"""Raw record batches -> model inputs with a prepared folder's vocabularies, batch by batch.

`RowEncoder(schema).encode(batch, layout)` gives the ids and dense values `prepare` writes for the
same rows (prepare encodes with it): the same column transforms (ctrkit/data/transforms.py), a
value of the training vocabulary gets its id (2..), any other value the out-of-vocabulary id 0, a
missing one id 1; a hashed feature's value gets 2 + FNV-1a-64(value) mod its hash_buckets.
Each vocabulary is loaded once into an index (ctrkit/data/hashing.py: values found exactly by a
64-bit key). A column of text or integers is looked up row by row, with no pass to find its
distinct values first; a dictionary-encoded column (as `prepare` reads) by its dictionary.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather

from ctrkit.data.formats import Feature, Layout
from ctrkit.data.hashing import VocabIndex, fnv1a64
from ctrkit.data.transforms import dense_column, sparse_column
from ctrkit.data.schema import MISSING_ID, OOV_ID, Schema
from ctrkit.errors import CtrkitError


_SMALL_UNSIGNED = (pa.uint8(), pa.uint16(), pa.uint32())   # (uint64 does not fit int64)


def _ids_of(found: np.ndarray) -> np.ndarray:
    """int32 ids of vocabulary positions: position i is id i + 2, absent (-1) the OOV id."""
    return np.where(found >= 0, found + 2, OOV_ID).astype(np.int32)


class RowEncoder:
    """Encodes raw rows for the model trained on `schema` (its folder holds the vocabularies)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._features = {f.name: f for f in schema.sparse}
        self._index: Dict[str, VocabIndex] = {}

    def check(self, layout: Layout, where: str) -> None:
        """The file's features must be the ones the model was trained on, in the same order."""
        have = [(f.name, "sparse" if f.is_sparse else "dense") for f in layout.features]
        want = [(f.name, f.kind) for f in self.schema.features]
        if have != want:
            raise CtrkitError(f"{where}: its features {[n for n, _ in have][:6]}... are not the "
                              f"ones the model was trained on ({[n for n, _ in want][:6]}...)")

    def index(self, name: str) -> VocabIndex:
        """The training vocabulary of feature `name`: position i holds the value of id i + 2."""
        ix = self._index.get(name)
        if ix is None:
            path = self.schema.vocab_path(name)
            try:
                values = feather.read_table(str(path), columns=["value"]).column("value")
            except (OSError, pa.ArrowInvalid, KeyError) as e:
                raise CtrkitError(f"{path}: unreadable vocabulary ({e})".splitlines()[0]) from None
            ix = self._index[name] = VocabIndex(values.combine_chunks())
        return ix

    def _remap(self, values: pa.Array, f: Feature) -> np.ndarray:
        """int32 ids of distinct (or any) non-null values of feature `f`."""
        info = self._features[f.name]
        if info.vocab == "hash":   # every value has a bucket: no out-of-vocabulary id
            return (fnv1a64(values) % np.uint64(info.hash_buckets)).astype(np.int32) + 2
        return _ids_of(self.index(f.name).positions(values))

    def _ids(self, col: pa.Array, f: Feature) -> np.ndarray:
        if self._features[f.name].vocab != "hash":
            if pa.types.is_signed_integer(col.type) or col.type in _SMALL_UNSIGNED:
                # (bucketed numerics, weekdays: no text made of them)
                values = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int64)
                return self._looked_up(self.index(f.name).int_positions(values), col)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                return self._looked_up(self.index(f.name).positions(col), col)
        d = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
        remap = self._remap(d.dictionary, f)
        idx = d.indices if d.indices.null_count == 0 else pc.fill_null(d.indices, -1)
        idx = idx.to_numpy(zero_copy_only=False)
        return np.append(remap, np.int32(MISSING_ID))[idx]   # (-1, missing, picks the last slot)

    @staticmethod
    def _looked_up(found: np.ndarray, col: pa.Array) -> np.ndarray:
        """int32 ids of every row of `col` from their vocabulary positions; a null is missing."""
        ids = _ids_of(found)
        if col.null_count:
            ids[col.is_null().to_numpy(zero_copy_only=False)] = MISSING_ID
        return ids

    def _bags(self, lists: pa.ListArray, f: Feature) -> Tuple[np.ndarray, np.ndarray]:
        """A multi-hot feature's (ids, lengths): each row's values' ids; a missing row is the
        one-id bag [missing]."""
        d = pc.dictionary_encode(pc.list_flatten(lists))
        ids = self._remap(d.dictionary, f)[d.indices.to_numpy(zero_copy_only=False)]
        lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(
            zero_copy_only=False).astype(np.int32)
        empty = lengths == 0
        if empty.any():   # insert id 1 where a row has no value
            starts = np.cumsum(lengths) - lengths
            ids = np.insert(ids, starts[empty], np.int32(MISSING_ID))
            lengths[empty] = 1
        return ids.astype(np.int32), lengths

    def encode(self, batch: pa.RecordBatch, layout: Layout) -> Tuple[
            np.ndarray, np.ndarray, Optional[np.ndarray], Dict[str, Tuple[np.ndarray, np.ndarray]]]:
        """(sparse ids [B, F] int32, dense [B, Dn] float32, labels [B] float32 or None, multi-hot
        bags {feature: (ids int32, lengths [B] int32)}; a multi-hot feature's column of `sparse`
        holds 0)."""
        n = batch.num_rows
        # filled feature by feature, so each column is written contiguously; `sparse` is its
        # transpose, [B, F] (a strided column write touched one cache line per row)
        columns = np.empty((len(layout.sparse), n), np.int32)
        sparse = columns.T
        multi: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for j, f in enumerate(layout.sparse):
            col = sparse_column(batch, f)
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            if f.is_multi:
                multi[f.name] = self._bags(col, f)
                columns[j] = 0
            else:
                columns[j] = self._ids(col, f)
        dense_cols: List[np.ndarray] = [dense_column([batch.column(f.source)], f, n)
                                        for f in layout.dense]
        dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((n, 0), np.float32)
        labels = None
        if layout.label:
            labels = batch.column(layout.label).to_numpy(zero_copy_only=False).astype(np.float32)
        return sparse, dense, labels, multi
