"""Encoded shards: one folder per shard holding row-major numpy arrays (memory-mappable), written
by `ShardWriter` as rows arrive.

`sparse.npy` is [rows, features] int32 ids, `dense.npy` [rows, dense features] float32,
`label.npy` [rows] float32. Row-major order keeps one sample's ids in one or two cache lines, so a
shuffled batch is B random reads, not B x features (5x faster batch assembly than column-major).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np


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


class ShardWriter:
    """Rows arriving batch by batch ([B, F] ids, [B, D] dense, [B] labels), written as shards of
    `shard_rows` rows (`<split>/part-00000`, ...) the moment one is full: memory is one shard's
    buffer, whatever the split's length. `close()` writes the rest (one empty shard for a split
    without rows) and returns the shards' names."""

    def __init__(self, root: Path, split: str, n_sparse: int, n_dense: int,
                 shard_rows: int) -> None:
        self.root, self.split, self.shard_rows = root, split, shard_rows
        self.sparse = np.empty((shard_rows, n_sparse), np.int32)   # (pages are touched only
        self.dense = np.empty((shard_rows, n_dense), np.float32)   # as rows arrive)
        self.labels = np.empty(shard_rows, np.float32)
        self.fill = 0
        self.rows = 0
        self.positives = 0.0
        self.names: List[str] = []

    def add(self, sparse: np.ndarray, dense: np.ndarray, labels: np.ndarray) -> None:
        start = 0
        while start < len(labels):
            take = min(len(labels) - start, self.shard_rows - self.fill)
            end = start + take
            self.sparse[self.fill:self.fill + take] = sparse[start:end]
            self.dense[self.fill:self.fill + take] = dense[start:end]
            self.labels[self.fill:self.fill + take] = labels[start:end]
            self.fill += take
            start = end
            if self.fill == self.shard_rows:
                self._flush()
        self.rows += len(labels)
        self.positives += float(labels.sum())

    def close(self) -> List[str]:
        if self.fill or not self.names:
            self._flush()
        return self.names

    def _flush(self) -> None:
        d = self.root / f"{self.split}/part-{len(self.names):05d}"
        d.mkdir(parents=True)
        _save_matrix(d / "sparse.npy", self.sparse[:self.fill])
        _save_matrix(d / "dense.npy", self.dense[:self.fill])
        np.save(d / "label.npy", np.ascontiguousarray(self.labels[:self.fill]))
        self.names.append(f"{self.split}/part-{len(self.names):05d}")
        self.fill = 0


def _save_matrix(path: Path, rows: np.ndarray) -> None:
    """A row-major [rows, width] array as `.npy` (the header np.save writes for it)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
            rows.dtype), "fortran_order": False, "shape": (int(rows.shape[0]), int(rows.shape[1]))})
        if rows.size:
            f.write(np.ascontiguousarray(rows).data)
