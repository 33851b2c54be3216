"""Encoded shards: one folder per shard holding row-major numpy arrays (memory-mappable).

`sparse.npy` is [rows, features] int32 ids, `dense.npy` [rows, dense features] float32,
`label.npy` [rows] float32. Row-major order keeps one sample's ids in one or two cache lines, so a
shuffled batch is B random reads, not B x features (5x faster batch assembly than column-major).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np


def write_shards(root: Path, split: str, sparse: Sequence[np.ndarray], dense: Sequence[np.ndarray],
                 labels: np.ndarray, shard_rows: int) -> List[str]:
    """Write per-feature id columns and dense columns as row-major shards of `shard_rows` rows.

    The columns come in one contiguous array per feature (how `prepare` encodes them, one feature
    per thread). Each shard's row-major `.npy` is written in row blocks transposed in a small
    buffer: no [rows, features] matrix is ever allocated, and no column is written with a stride
    (a strided column write touched one cache line per row: ~20 ms per feature per 1M rows)."""
    names = []
    n = labels.shape[0]
    for i, start in enumerate(range(0, max(n, 1), shard_rows)):
        end = min(n, start + shard_rows)
        name = f"{split}/part-{i:05d}"
        d = root / name
        d.mkdir(parents=True)
        _save_rows(d / "sparse.npy", sparse, start, end, np.int32)
        _save_rows(d / "dense.npy", dense, start, end, np.float32)
        np.save(d / "label.npy", np.ascontiguousarray(labels[start:end]))
        names.append(name)
    return names


_BLOCK_ROWS = 8192   # 26 features x 8192 rows x 4 bytes: the transposed block stays in L2


def _save_rows(path: Path, columns: Sequence[np.ndarray], start: int, end: int,
               dtype: type) -> None:
    """rows start..end of the columns, as one [rows, len(columns)] `.npy` file."""
    rows, width = int(end - start), len(columns)   # Python ints: numpy ints corrupt the header
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
            np.dtype(dtype)), "fortran_order": False, "shape": (rows, width)})
        if not rows or not width:
            return
        buf = np.empty((min(_BLOCK_ROWS, rows), width), dtype)
        for s in range(start, end, _BLOCK_ROWS):
            e = min(end, s + _BLOCK_ROWS)
            block = buf[:e - s]
            for j, col in enumerate(columns):
                block[:, j] = col[s:e]
            f.write(block.data)


@dataclass
class Shard:
    sparse: np.ndarray   # [n, F] int32
    dense: np.ndarray    # [n, Dn] float32
    labels: np.ndarray   # [n] float32

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])


def load_shard(root: Path, name: str, mmap: bool = True) -> Shard:
    mode = "r" if mmap else None
    d = Path(root) / name
    return Shard(np.load(d / "sparse.npy", mmap_mode=mode), np.load(d / "dense.npy", mmap_mode=mode),
                 np.load(d / "label.npy", mmap_mode=mode))
