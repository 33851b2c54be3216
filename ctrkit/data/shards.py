"""Encoded shards: one folder per shard holding row-major numpy arrays (memory-mappable), written
by `ShardWriter` as rows arrive.

`sparse.npy` is [rows, features] int32 ids, `dense.npy` [rows, dense features] float32,
`label.npy` [rows] float32. Row-major order keeps one sample's ids in one or two cache lines, so a
shuffled batch is B random reads, not B x features (5x faster batch assembly than column-major).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class Shard:
    sparse: np.ndarray   # [n, F] int32 (a multi-hot feature's column holds 0: its ids are in multi)
    dense: np.ndarray    # [n, Dn] float32
    labels: np.ndarray   # [n] float32
    # multi-hot features: name -> (ids [total] int32, offsets [n + 1] int64): row i's bag is
    # ids[offsets[i]:offsets[i + 1]]
    multi: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        """The multi-hot bags of rows `idx`: name -> (ids, lengths [len(idx)] int32)."""
        out = {}
        for name, (ids, offsets) in self.multi.items():
            starts, ends = offsets[idx], offsets[np.asarray(idx) + 1]
            lengths = (ends - starts).astype(np.int32)
            total = int(lengths.sum())
            within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            out[name] = (np.asarray(ids[np.repeat(starts, lengths) + within]), lengths)
        return out


def load_shard(root: Path, name: str, mmap: bool = True) -> Shard:
    mode = "r" if mmap else None
    d = Path(root) / name
    multi = {p.name[:-len(MULTI_IDS)]: (np.load(p, mmap_mode=mode),
                                        np.load(d / (p.name[:-len(MULTI_IDS)] + MULTI_OFFSETS),
                                                mmap_mode=mode))
             for p in sorted(d.glob("*" + MULTI_IDS))}
    return Shard(np.load(d / "sparse.npy", mmap_mode=mode), np.load(d / "dense.npy", mmap_mode=mode),
                 np.load(d / "label.npy", mmap_mode=mode), multi)


Bags = Dict[str, Tuple[np.ndarray, np.ndarray]]   # multi-hot feature -> (ids, lengths [B])


def bag_rows(multi: Bags, start: int, end: int) -> Bags:
    """Rows start..end of multi-hot bags."""
    out = {}
    for name, (ids, lengths) in multi.items():
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        out[name] = (ids[offsets[start]:offsets[end]], lengths[start:end])
    return out


MULTI_IDS, MULTI_OFFSETS = ".ids.npy", ".offsets.npy"   # <feature>.ids.npy, <feature>.offsets.npy


class ShardWriter:
    """Rows arriving batch by batch ([B, F] ids, [B, D] dense, [B] labels), written as shards of
    `shard_rows` rows (`<split>/part-00000`, ...) the moment one is full: memory is one shard's
    buffer, whatever the split's length. `close()` writes the rest (one empty shard for a split
    without rows) and returns the shards' names."""

    def __init__(self, root: Path, split: str, n_sparse: int, n_dense: int,
                 shard_rows: int, multi: Tuple[str, ...] = (), tag: str = "") -> None:
        self.root, self.split, self.shard_rows = root, split, shard_rows
        self.tag = tag   # shards are <split>/part-<tag>00000, ...
        self.multi_names = tuple(multi)   # multi-hot features: their bags arrive in add(multi=)
        self._bags: Dict[str, List[Tuple[np.ndarray, np.ndarray]]] = {m: [] for m in multi}
        self.sparse = np.empty((shard_rows, n_sparse), np.int32)   # (pages are touched only
        self.dense = np.empty((shard_rows, n_dense), np.float32)   # as rows arrive)
        self.labels = np.empty(shard_rows, np.float32)
        self.fill = 0
        self.rows = 0
        self.positives = 0.0
        self.names: List[str] = []

    def add(self, sparse: np.ndarray, dense: np.ndarray, labels: np.ndarray,
            multi: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None) -> None:
        """Rows: ids [B, F], dense [B, D], labels [B]; `multi`: name -> (ids, lengths [B])."""
        offsets = {m: np.concatenate([[0], np.cumsum(multi[m][1], dtype=np.int64)])
                   for m in self.multi_names}
        start = 0
        while start < len(labels):
            take = min(len(labels) - start, self.shard_rows - self.fill)
            end = start + take
            for m in self.multi_names:
                ids, lengths = multi[m]
                self._bags[m].append((ids[offsets[m][start]:offsets[m][end]], lengths[start:end]))
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
        name = f"{self.split}/part-{self.tag}{len(self.names):05d}"
        d = self.root / name
        d.mkdir(parents=True)
        _save_matrix(d / "sparse.npy", self.sparse[:self.fill])
        _save_matrix(d / "dense.npy", self.dense[:self.fill])
        np.save(d / "label.npy", np.ascontiguousarray(self.labels[:self.fill]))
        for m in self.multi_names:
            parts = self._bags[m]
            ids = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int32)
            lengths = np.concatenate([n for _, n in parts]) if parts else np.zeros(0, np.int32)
            np.save(d / (m + MULTI_IDS), ids.astype(np.int32))
            np.save(d / (m + MULTI_OFFSETS), np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
            self._bags[m] = []
        self.names.append(name)
        self.fill = 0


def _save_matrix(path: Path, rows: np.ndarray) -> None:
    """A row-major [rows, width] array as `.npy` (the header np.save writes for it)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
            rows.dtype), "fortran_order": False, "shape": (int(rows.shape[0]), int(rows.shape[1]))})
        if rows.size:
            f.write(np.ascontiguousarray(rows).data)
