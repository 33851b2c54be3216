"""Every reader on the real Criteo/Avazu slices in ../shared/data; every row accounted for."""
import gzip
import shutil

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ctrkit.data.preprocess import prepare
from ctrkit.data.shards import load_shard
from tests.conftest import AVAZU, CRITEO, LAPIS_AVAZU, LAPIS_CRITEO, count_lines

pytestmark = pytest.mark.shared_data


def _check_split(schema, split, expected_rows):
    info = schema.splits[split]
    assert info.rows_read == expected_rows
    assert info.rows_written == expected_rows
    assert info.rows_skipped == 0
    total = sum(load_shard(schema.root, s).rows for s in info.shards)
    assert total == expected_rows


def test_criteo_tsv_lapis(make_cfg):
    cfg = make_cfg({"format": "criteo_tsv", "train": str(LAPIS_CRITEO / "train.csv"),
                    "valid": str(LAPIS_CRITEO / "dev.csv"), "test": str(LAPIS_CRITEO / "test.csv"),
                    "dense_transform": "log"})
    s = prepare(cfg, progress=False)
    _check_split(s, "train", 7200)
    _check_split(s, "valid", 409)
    _check_split(s, "test", 391)
    assert [f.name for f in s.sparse] == [f"C{i}" for i in range(1, 27)]
    assert [f.name for f in s.dense] == [f"I{i}" for i in range(1, 14)]
    sh = load_shard(s.root, s.splits["train"].shards[0])
    assert sh.sparse.shape == (7200, 26) and sh.dense.shape == (7200, 13)
    assert abs(sh.labels.mean() - 0.215) < 0.01
    # every id is inside its vocabulary; missing C values map to id 1
    for i, f in enumerate(s.sparse):
        assert sh.sparse[:, i].max() < f.vocab_size
    c22 = [f.name for f in s.sparse].index("C22")
    assert (sh.sparse[:, c22] == 1).any()
    assert (s.root / "vocab" / "C1.arrow").is_file()


def test_criteo_bucket_makes_numerics_categorical(make_cfg):
    cfg = make_cfg({"format": "criteo_tsv", "train": str(CRITEO / "PaddlePaddle_PaddleRec" / "part-0"),
                    "dense_transform": "criteo_bucket"})
    s = prepare(cfg, progress=False)
    _check_split(s, "train", 100)
    assert len(s.sparse) == 39 and not s.dense


def test_criteo_csv_with_header(make_cfg):
    path = CRITEO / "ChenglongChen_kaggle-2014-criteo" / "train.tiny.csv"
    s = prepare(make_cfg({"format": "criteo_csv", "train": str(path)}), progress=False)
    _check_split(s, "train", count_lines(path, header=True))
    assert s.label == "Label"


def test_criteo_csv_deepctr_float_values(make_cfg):
    path = CRITEO / "shenweichen_DeepCTR" / "criteo_sample.txt"
    s = prepare(make_cfg({"format": "criteo_csv", "train": str(path)}), progress=False)
    _check_split(s, "train", 200)


def test_criteo_gzip(make_cfg, tmp_path):
    src = LAPIS_CRITEO / "dev.csv"
    gz = tmp_path / "dev.tsv.gz"
    with open(src, "rb") as fi, gzip.open(gz, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    s = prepare(make_cfg({"format": "criteo_tsv", "train": str(gz)}), progress=False)
    _check_split(s, "train", 409)


def test_avazu_header_and_headerless(make_cfg):
    cfg = make_cfg({"format": "avazu_csv", "train": str(LAPIS_AVAZU / "train.csv"),
                    "valid": str(LAPIS_AVAZU / "dev.csv"), "test": str(LAPIS_AVAZU / "test.csv")})
    s = prepare(cfg, progress=False)
    _check_split(s, "train", 8087)
    _check_split(s, "valid", 480)     # dev.csv has no header row
    _check_split(s, "test", 432)
    names = [f.name for f in s.sparse]
    assert names[:3] == ["hour", "weekday", "weekend"] and "id" not in names and "click" not in names
    # all rows are 2014-10-21 00h (a Tuesday): one hour value, one weekday, not a weekend
    sh = load_shard(s.root, s.splits["train"].shards[0])
    assert set(np.unique(sh.sparse[:, :3])) == {2}


def test_avazu_deepctr_sample(make_cfg):
    path = AVAZU / "shenweichen_DeepCTR" / "avazu_sample.txt"
    s = prepare(make_cfg({"format": "avazu_csv", "train": str(path)}), progress=False)
    _check_split(s, "train", 100)


def _generic_features():
    return [{"name": f"I{i}", "type": "numeric", "transform": "log"} for i in range(1, 14)] + \
           [{"name": f"C{i}", "type": "categorical"} for i in range(1, 27)]


def test_generic_csv_and_parquet(make_cfg, tmp_path):
    path = CRITEO / "shenweichen_DeepCTR" / "criteo_sample.txt"
    s = prepare(make_cfg({"format": "csv", "train": str(path), "label": "label",
                          "features": _generic_features()}), progress=False)
    _check_split(s, "train", 200)
    table = pacsv.read_csv(path)
    pq.write_table(table, tmp_path / "sample.parquet")
    s2 = prepare(make_cfg({"format": "parquet", "train": str(tmp_path / "sample.parquet"),
                           "label": "label", "features": _generic_features(),
                           "prepared_dir": str(tmp_path / "prep2")}), progress=False)
    _check_split(s2, "train", 200)
    a = load_shard(s.root, s.splits["train"].shards[0])
    b = load_shard(s2.root, s2.splits["train"].shards[0])
    assert np.array_equal(a.sparse, b.sparse) and np.allclose(a.dense, b.dense)


def test_min_count_maps_rare_values_to_oov(make_cfg):
    cfg = make_cfg({"format": "criteo_tsv", "train": str(LAPIS_CRITEO / "train.csv"), "min_count": 5})
    s = prepare(cfg, progress=False)
    sh = load_shard(s.root, s.splits["train"].shards[0])
    c3 = [f.name for f in s.sparse].index("C3")
    assert (sh.sparse[:, c3] == 0).mean() > 0.3     # C3 is mostly rare hashes
    assert s.sparse[c3].vocab_size < 7200
