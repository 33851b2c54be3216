"""Encoded shards: one folder per shard holding column-major numpy arrays (memory-mappable).

`sparse.npy` is [features, rows] int32 ids, `dense.npy` [dense features, rows] float32,
`label.npy` [rows] float32. Column-major order makes a batch's ids for one feature contiguous,
which is exactly the table-major value layout a KeyedJaggedTensor wants.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np


def write_shards(root: Path, split: str, sparse: np.ndarray, dense: np.ndarray, labels: np.ndarray,
                 shard_rows: int) -> List[str]:
    names = []
    n = labels.shape[0]
    for i, start in enumerate(range(0, max(n, 1), shard_rows)):
        end = min(n, start + shard_rows)
        name = f"{split}/part-{i:05d}"
        d = root / name
        d.mkdir(parents=True)
        np.save(d / "sparse.npy", np.ascontiguousarray(sparse[:, start:end]))
        np.save(d / "dense.npy", np.ascontiguousarray(dense[:, start:end]))
        np.save(d / "label.npy", np.ascontiguousarray(labels[start:end]))
        names.append(name)
    return names


@dataclass
class Shard:
    sparse: np.ndarray   # [F, n] int32
    dense: np.ndarray    # [Dn, n] float32
    labels: np.ndarray   # [n] float32

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])


def load_shard(root: Path, name: str, mmap: bool = True) -> Shard:
    mode = "r" if mmap else None
    d = Path(root) / name
    return Shard(np.load(d / "sparse.npy", mmap_mode=mode), np.load(d / "dense.npy", mmap_mode=mode),
                 np.load(d / "label.npy", mmap_mode=mode))
