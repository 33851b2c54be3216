"""`data.vocab: count` with `max_size`, and `vocab: hash`: what prepare writes, the config's checks,
and a hashed run's train -> predict -> export -> serve round trip."""
import numpy as np
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from ctrkit.config import load_config
from ctrkit.data.loader import BatchLoader
from ctrkit.data.preprocess import prepare
from ctrkit.data.shards import load_shard
from ctrkit.errors import ConfigError
from ctrkit.metrics import predict as eval_predict
from ctrkit.serving.predict import Predictor
from ctrkit.train.run import train
from tests.conftest import LAPIS_CRITEO
from tests.test_export import _example_matches_prepare
from tests.test_hashing import _fnv_reference

pytestmark = pytest.mark.shared_data
SLICE = [f"data.train={LAPIS_CRITEO / 'train.csv'}", f"data.valid={LAPIS_CRITEO / 'dev.csv'}",
         "data.format=criteo_tsv"]


@pytest.mark.parametrize("overrides, message", [
    (["data.hash_buckets=0"], "data.hash_buckets: Input should be greater than or equal to 1"),
    (["data.max_size=0"], "data.max_size: Input should be greater than or equal to 1"),
    (["data.vocab=hash"], "data.vocab=hash needs data.hash_buckets"),
    (["data.vocab=hash", "data.hash_buckets=10", "data.max_size=5"],
     "data.max_size is for vocab=count"),
    (["data.vocab=lookup"], "data.vocab: Input should be 'count' or 'hash'"),
])
def test_bad_vocabulary_keys_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_max_size_keeps_the_most_frequent_values(tmp_path):
    full = prepare(load_config(None, SLICE + [f"data.prepared_dir={tmp_path / 'a'}"]), False)
    capped = prepare(load_config(None, SLICE + [f"data.prepared_dir={tmp_path / 'b'}",
                                                "data.max_size=5"]), False)
    for f, g in zip(full.sparse, capped.sparse):
        want = feather.read_table(str(full.vocab_path(f.name))).slice(0, 5)
        got = feather.read_table(str(capped.vocab_path(g.name)))
        assert got.equals(want) and g.vocab_size == min(f.vocab_size, 7) and g.max_size == 5
    ids = load_shard(capped.root, capped.splits["train"].shards[0]).sparse
    full_ids = load_shard(full.root, full.splits["train"].shards[0]).sparse
    assert ids.max() <= 6
    assert np.array_equal(ids, np.where(full_ids >= 7, 0, full_ids))   # the rest -> OOV 0


def test_hashed_ids_are_the_documented_hash(tmp_path):
    cfg = load_config(None, SLICE + [f"data.prepared_dir={tmp_path / 'h'}", "data.vocab=hash",
                                     "data.hash_buckets=1000"])
    schema = prepare(cfg, progress=False)
    assert not list((schema.root / "vocab").iterdir())                 # no vocabulary files
    assert all(f.vocab == "hash" and f.vocab_size == 1002 for f in schema.sparse)
    first = (LAPIS_CRITEO / "train.csv").read_text().splitlines()[0].split("\t")
    ids = load_shard(schema.root, schema.splits["train"].shards[0]).sparse[0]
    for j, raw in enumerate(first[14:]):                               # C1..C26 of row 1
        want = 1 if raw == "" else 2 + _fnv_reference(raw) % 1000
        assert ids[j] == want


def test_a_hashed_run_trains_predicts_and_exports(tmp_path):
    cfg = load_config(None, SLICE + [
        f"data.prepared_dir={tmp_path / 'prep'}", f"train.run_dir={tmp_path / 'run'}",
        "data.vocab=hash", "data.hash_buckets=4096", "data.dense_transform=criteo_bucket",
        "model.embedding_dim=8", "model.hidden_units=[16]", "train.max_steps=20",
        "train.eval_every=0", "train.progress=false", "train.tensorboard=false",
        "train.plot=false", "train.threads=1"])
    run = train(cfg).run_dir
    p = Predictor.load(run)
    schema = p.schema
    _, ref = eval_predict(p.model, BatchLoader(load_prepared(cfg), "valid", 1000, prefetch=0))
    s = p.predict_files([str(LAPIS_CRITEO / "dev.csv")], tmp_path / "s.parquet", progress=False)
    got = pq.read_table(tmp_path / "s.parquet").column("probability").to_numpy()
    assert s.rows_written == len(ref)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert all(f.vocab == "hash" for f in schema.sparse)
    _example_matches_prepare(load_prepared(cfg), p.model, LAPIS_CRITEO / "dev.csv", tmp_path)


def load_prepared(cfg):
    from ctrkit.data.schema import Schema
    return Schema.load(cfg.data.prepared_dir)
