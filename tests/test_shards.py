"""Shards are written from per-feature columns into row-major .npy files, block by block."""
import numpy as np

from ctrkit.data import shards
from ctrkit.data.shards import load_shard, write_shards


def test_columns_become_row_major_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_BLOCK_ROWS", 7)   # blocks that split shards unevenly
    rng = np.random.default_rng(0)
    n = 50
    sparse = [rng.integers(0, 1000, n).astype(np.int32) for _ in range(5)]
    dense = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    labels = (rng.random(n) < 0.3).astype(np.float32)
    names = write_shards(tmp_path, "train", sparse, dense, labels, shard_rows=20)
    assert names == ["train/part-00000", "train/part-00001", "train/part-00002"]
    got = [load_shard(tmp_path, nm) for nm in names]
    assert [s.rows for s in got] == [20, 20, 10]
    assert np.array_equal(np.concatenate([s.sparse for s in got]), np.stack(sparse, axis=1))
    assert np.array_equal(np.concatenate([s.dense for s in got]), np.stack(dense, axis=1))
    assert np.array_equal(np.concatenate([s.labels for s in got]), labels)
    assert got[0].sparse.dtype == np.int32 and got[0].sparse.flags.c_contiguous


def test_no_dense_features(tmp_path):
    ids = [np.arange(4, dtype=np.int32)]
    write_shards(tmp_path, "valid", ids, [], np.zeros(4, np.float32), shard_rows=10)
    s = load_shard(tmp_path, "valid/part-00000", mmap=False)
    assert s.dense.shape == (4, 0) and s.sparse.shape == (4, 1)
