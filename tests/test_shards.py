"""Shards are written from batches of rows into row-major .npy files, one shard as it fills."""
import numpy as np

from ctrkit.data.shards import ShardWriter, load_shard


def _write(root, split, sparse, dense, labels, shard_rows, batch=7):
    """Rows in batches of 7: batches that split shards unevenly."""
    w = ShardWriter(root, split, sparse.shape[1], dense.shape[1], shard_rows)
    for s in range(0, len(labels), batch):
        w.add(sparse[s:s + batch], dense[s:s + batch], labels[s:s + batch])
    return w.close()


def test_rows_become_row_major_shards(tmp_path):
    rng = np.random.default_rng(0)
    n = 50
    sparse = [rng.integers(0, 1000, n).astype(np.int32) for _ in range(5)]
    dense = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    labels = (rng.random(n) < 0.3).astype(np.float32)
    names = _write(tmp_path, "train", np.stack(sparse, axis=1), np.stack(dense, axis=1), labels,
                   shard_rows=20)
    assert names == ["train/part-00000", "train/part-00001", "train/part-00002"]
    got = [load_shard(tmp_path, nm) for nm in names]
    assert [s.rows for s in got] == [20, 20, 10]
    assert np.array_equal(np.concatenate([s.sparse for s in got]), np.stack(sparse, axis=1))
    assert np.array_equal(np.concatenate([s.dense for s in got]), np.stack(dense, axis=1))
    assert np.array_equal(np.concatenate([s.labels for s in got]), labels)
    assert got[0].sparse.dtype == np.int32 and got[0].sparse.flags.c_contiguous
    raw = np.load(tmp_path / names[1] / "sparse.npy")   # the header np.save writes
    assert raw.shape == (20, 5) and np.array_equal(raw, np.stack(sparse, axis=1)[20:40])


def test_no_dense_features(tmp_path):
    ids = np.arange(4, dtype=np.int32)[:, None]
    _write(tmp_path, "valid", ids, np.zeros((4, 0), np.float32), np.zeros(4, np.float32),
           shard_rows=10)
    s = load_shard(tmp_path, "valid/part-00000", mmap=False)
    assert s.dense.shape == (4, 0) and s.sparse.shape == (4, 1)


def test_a_split_without_rows_has_one_empty_shard(tmp_path):
    w = ShardWriter(tmp_path, "test", 3, 2, 10)
    assert w.close() == ["test/part-00000"]
    s = load_shard(tmp_path, "test/part-00000", mmap=False)
    assert s.rows == 0 and s.sparse.shape == (0, 3) and s.dense.shape == (0, 2)
