"""Feature columns from raw record-batch columns: the transforms `prepare` and `predict` share.

`sparse_column` gives a categorical feature's values (Avazu's derived hour / weekday / weekend,
Criteo's numeric buckets, fills), to be looked up in its vocabulary; `dense_column` a numeric
feature as float32 (fill, `log`). preprocess.py fits vocabularies on them, encode.py looks rows
up with them; `preprocess.json` (ctrkit/serving/preprocess_spec.py) writes the same rules down.
"""
from __future__ import annotations

from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctrkit.data.formats import Feature


def derived(col: pa.Array, kind: str) -> pa.Array:
    """Avazu's `hour` (YYMMDDHH) -> hour of day, weekday, weekend flag."""
    if kind == "avazu_hour":
        return pc.utf8_slice_codeunits(col, 6, 8)
    ts = pc.strptime(col, format="%y%m%d%H", unit="s", error_is_null=True)
    dow = pc.day_of_week(ts)
    if kind == "avazu_weekday":
        return dow
    return pc.greater_equal(dow, 5)


def criteo_bucket(col: pa.Array) -> pa.Array:
    """floor(ln(x)^2) for x > 2, x itself otherwise (the Criteo winners' numeric bucketing)."""
    x = col.to_numpy(zero_copy_only=False)
    mask = np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(x > 2, np.floor(np.log(np.where(x > 2, x, 1.0)) ** 2), np.floor(x))
    # (the reader refuses infinities; a huge negative value must not overflow int64 either)
    b = np.clip(np.where(mask, 0, b), -2.0 ** 62, 2.0 ** 62).astype(np.int64)
    return pa.array(b, mask=mask)


def sparse_column(batch: pa.RecordBatch, f: Feature) -> pa.Array:
    col = batch.column(f.source)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if f.derive:
        return derived(col, f.derive)
    if f.transform == "criteo_bucket":
        return criteo_bucket(col)
    if f.fill is not None:
        col = pc.fill_null(col, pa.scalar(str(f.fill)))
    if f.is_multi:
        return multi_values(col, f)
    return col


def multi_values(col: pa.Array, f: Feature) -> pa.ListArray:
    """A multi_categorical field's values: split at the separator, empty values dropped, the
    first `max_len` kept; a missing or empty field is a null (missing) bag."""
    col = col.cast(pa.string()) if not pa.types.is_string(col.type) else col
    lists = pc.split_pattern(col, f.separator)
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    flat, parent = flat.filter(pa.array(keep)), parent[keep]
    counts = np.bincount(parent, minlength=len(col)).astype(np.int64)
    if f.max_len is not None and (counts > f.max_len).any():
        starts = np.cumsum(counts) - counts
        rank = np.arange(len(parent)) - np.repeat(starts, counts)
        take = rank < f.max_len
        flat, parent = flat.filter(pa.array(take)), parent[take]
        counts = np.minimum(counts, f.max_len)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat, mask=pa.array(counts == 0))


def dense_column(chunks: List[pa.Array], f: Feature, rows: int) -> np.ndarray:
    """One numeric feature, filled and transformed, as a contiguous float32 column."""
    fill = float(f.fill or 0.0)
    if not chunks:
        return np.full(rows, fill, np.float32)
    # Nulls arrive as NaN, like a NaN written in the file: both get the fill value.
    x64 = pa.chunked_array(chunks).to_numpy()
    with np.errstate(over="ignore"):
        x = x64.astype(np.float32)
    x[np.isnan(x)] = fill
    if f.transform == "log":
        y = np.log1p(np.abs(x))
        np.copysign(y, x, out=x)
    big = np.isinf(x)   # finite in the file, beyond float32 (the reader refuses those without log)
    if big.any():
        x[big] = np.copysign(np.log1p(np.abs(x64[big])), x64[big])
    return x
