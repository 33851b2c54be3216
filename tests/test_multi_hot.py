"""Multi-hot features (`type: multi_categorical`): a field of several values becomes one bag of
ids with its real length; prepare, the loader, the tables' pooling, training and predict agree."""
import numpy as np
import pandas as pd
import pytest
import torch

from ctrkit.config import load_config
from ctrkit.data.loader import BatchLoader
from ctrkit.data.preprocess import prepare
from ctrkit.data.shards import load_shard
from ctrkit.errors import ConfigError
from ctrkit.metrics import predict as eval_predict
from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
from ctrkit.serving.predict import Predictor
from ctrkit.train.run import train
from torchrec import KeyedJaggedTensor

FEATURES = ('[{"name": "user", "type": "categorical"}, {"name": "price", "type": "numeric"}, '
            '{"name": "tags", "type": "multi_categorical", "separator": "|", "max_len": 3}, '
            '{"name": "cats", "type": "multi_categorical", "separator": ";", "pooling": "mean"}]')


def _csv(path, rows, seed):
    """Clicks that depend on the tags: any of t0..t4 raises the click rate."""
    rng = np.random.default_rng(seed)
    tags, cats, label = [], [], []
    for _ in range(rows):
        k = rng.integers(0, 5)
        t = [f"t{x}" for x in rng.choice(20, size=k, replace=False)]
        tags.append("|".join(t))
        cats.append(";".join(f"c{x}" for x in rng.integers(0, 6, rng.integers(1, 3))))
        hot = any(int(x[1:]) < 5 for x in t)
        label.append(int(rng.random() < (0.7 if hot else 0.15)))
    pd.DataFrame({"label": label, "user": [f"u{x}" for x in rng.integers(0, 30, rows)],
                  "price": rng.random(rows).round(3), "tags": tags, "cats": cats}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    return _csv(d / "train.csv", 3000, 0), _csv(d / "valid.csv", 600, 1), d


def _cfg(data, tmp_path, *extra):
    train_csv, valid_csv, _ = data
    return load_config(None, [
        "data.format=csv", f"data.features={FEATURES}", f"data.train={train_csv}",
        f"data.valid={valid_csv}", f"data.prepared_dir={tmp_path / 'prep'}",
        f"train.run_dir={tmp_path / 'run'}", "model.name=deepfm", "model.embedding_dim=8",
        "model.hidden_units=[16]", "train.batch_size=128", "train.epochs=3", "train.eval_every=0",
        "train.progress=false", "train.tensorboard=false", "train.plot=false", "train.threads=1",
        "optimizer.dense.lr=0.01", "optimizer.sparse.lr=0.05", *extra])


def test_prepare_writes_each_rows_bag(data, tmp_path):
    schema = prepare(_cfg(data, tmp_path), progress=False)
    tags = next(f for f in schema.sparse if f.name == "tags")
    assert tags.multi and tags.separator == "|" and tags.max_len == 3
    shard = load_shard(schema.root, schema.splits["train"].shards[0])
    ids, offsets = shard.multi["tags"]
    raw = pd.read_csv(data[0], keep_default_na=False)["tags"]
    import pyarrow.feather as feather
    values = feather.read_table(str(schema.vocab_path("tags"))).column("value").to_pylist()
    for i in range(50):
        got = ids[offsets[i]:offsets[i + 1]].tolist()
        want = [values.index(v) + 2 for v in raw[i].split("|")[:3]] if raw[i] else [1]
        assert got == want, (i, raw[i])
    assert schema.splits["train"].rows_written == 3000


def test_mixed_pooling_tables_pool_by_their_rule():
    tables = [table_config("a", "a", 10, 4, "sum"), table_config("b", "b", 10, 4, "mean")]
    bags = BatchedEmbeddingBags(tables)
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2, 3, 4, 5, 6]),
                            lengths=torch.tensor([2, 1, 1, 2], dtype=torch.int32), stride=2)
    with torch.no_grad():
        out = bags(kjt)
        w0, w1 = bags.table_weight(0), bags.table_weight(1)
    assert torch.allclose(out[0, 0], w0[1] + w0[2]) and torch.allclose(out[1, 0], w0[3])
    assert torch.allclose(out[0, 1], w1[4]) and torch.allclose(out[1, 1], (w1[5] + w1[6]) / 2)


def test_deepfm_learns_from_a_multi_hot_column_and_predict_agrees(data, tmp_path):
    cfg = _cfg(data, tmp_path)
    res = train(cfg)
    assert res.metrics["valid"]["auc"] > 0.75, res.metrics   # the signal is in the tags alone
    p = Predictor.load(res.run_dir)
    from ctrkit.data.schema import Schema
    _, ref = eval_predict(p.model, BatchLoader(Schema.load(cfg.data.prepared_dir), "valid", 100,
                                               prefetch=0))
    got = p.predict(pd.read_csv(data[1], keep_default_na=False, dtype=str))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_multi_keys_on_other_types_are_config_errors():
    bad = '[{"name": "x", "type": "numeric", "separator": "|"}]'
    with pytest.raises(ConfigError, match="separator: only for type multi_categorical"):
        load_config(None, ["data.format=csv", f"data.features={bad}"])
    with pytest.raises(ConfigError, match="multi_categorical needs a separator"):
        load_config(None, ["data.format=csv",
                           'data.features=[{"name": "x", "type": "multi_categorical"}]'])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["distributed.algorithm=damsgrad"],
                                   ["distributed.algorithm=choco", "distributed.shard_group_size=2",
                                    "distributed.workers=4"]])
def test_gossip_and_shard_groups_train_multi_hot_bags(data, tmp_path, extra):
    """The gossip algorithms (and torchrec's sharded tables inside shard groups) take the bags
    unchanged: the averaged model learns the tags' signal."""
    cfg = _cfg(data, tmp_path, "distributed.workers=2", "distributed.timeout_s=300", *extra)
    res = train(cfg)
    assert res.metrics["valid"]["auc"] > 0.7, res.metrics


def test_a_multi_hot_run_exports_and_the_example_loader_scores_it(data, tmp_path):
    """Export takes a KeyedJaggedTensor's values and lengths for such a run: the program, run
    by examples/serve_exported.py with torch and pyarrow only on the raw validation CSV (bags
    split, capped at max_len, empty ones [missing]), gives predict's scores to 1e-6."""
    import json

    from ctrkit.cli import main
    from tests.test_export import BLOCK, EXAMPLE, _isolated
    res = train(_cfg(data, tmp_path, "train.epochs=1"))
    out = tmp_path / "served"
    assert main(["export", str(res.run_dir), "--out", str(out), "--quiet"]) == 0
    spec = json.loads((out / "preprocess.json").read_text())
    assert [i["name"] for i in spec["program"]["inputs"]] == ["dense", "values", "lengths"]
    tags = next(f for f in spec["sparse"] if f["name"] == "tags")
    assert tags["multi"]["separator"] == "|" and tags["multi"]["max_len"] == 3
    raw = pd.read_csv(data[1], keep_default_na=False, dtype=str)
    raw.loc[0, "tags"] = "||t1|t2|t3|t4|"          # empty parts, over max_len
    raw.loc[1, "tags"] = ""                        # no part: [missing]
    raw.to_csv(tmp_path / "valid.csv", index=False)
    want = Predictor.load(res.run_dir).predict(raw)
    code = BLOCK + "import runpy\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    _isolated(code, tmp_path, str(EXAMPLE), str(out), str(tmp_path / "valid.csv"),
              str(tmp_path / "p.txt"))
    np.testing.assert_allclose(np.loadtxt(tmp_path / "p.txt"), want, rtol=0, atol=1e-6)
