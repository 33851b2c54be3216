"""Loader slicing/ordering and the CLI path synth -> prepare -> train -> eval."""
import json

import numpy as np
import pytest

from ctrkit.cli import main
from ctrkit.data.loader import BatchLoader
from ctrkit.data.preprocess import prepare
from ctrkit.data.synth import write_synthetic


@pytest.fixture(scope="module")
def synth_schema(tmp_path_factory):
    from ctrkit.config import load_config
    d = tmp_path_factory.mktemp("synth")
    write_synthetic(d / "raw", 5000, valid_rows=1000, test_rows=1000, seed=1, card_scale=0.01,
                    progress=False)
    cfg = load_config(None, [f"data.train={d / 'raw' / 'train.tsv'}",
                             f"data.valid={d / 'raw' / 'valid.tsv'}",
                             f"data.prepared_dir={d / 'prep'}", "data.shard_rows=1500"])
    return prepare(cfg, progress=False)


def _labels_ids(loader):
    out = []
    for b in loader:
        out.append(b.sparse.values().view(len(loader.keys), -1)[0].numpy())
    return np.concatenate(out)


def test_ranks_get_disjoint_slices_covering_the_split(synth_schema):
    seen = []
    for rank in range(3):
        ld = BatchLoader(synth_schema, "train", 64, shuffle=True, seed=3, rank=rank, world_size=3)
        rows = sum(b.size for b in ld)
        assert rows == ld.rows()
        seen.append(rows)
    assert sum(seen) == 5000


def test_order_is_deterministic_and_resumable(synth_schema):
    ld = BatchLoader(synth_schema, "train", 100, shuffle=True, seed=7, prefetch=2)
    ld.set_position(1)
    a = _labels_ids(ld)
    ld.set_position(1, 10)
    b = _labels_ids(ld)
    assert np.array_equal(a[1000:], b)
    ld.set_position(2)
    assert not np.array_equal(a, _labels_ids(ld))    # a new epoch reshuffles
    batch = next(iter(BatchLoader(synth_schema, "valid", 256)))
    assert batch.dense.shape == (256, 13) and batch.labels.shape == (256,)
    assert batch.sparse.keys() == [f"C{i}" for i in range(1, 27)]


def test_cli_end_to_end(tmp_path, capsys):
    raw, prep, run = tmp_path / "raw", tmp_path / "prep", tmp_path / "run"
    common = [f"synth.out_dir={raw}", f"data.train={raw / 'train.tsv'}", f"data.valid={raw / 'valid.tsv'}",
              f"data.test={raw / 'test.tsv'}", f"data.prepared_dir={prep}", f"train.run_dir={run}",
              "synth.rows=6000", "synth.valid_rows=2000", "synth.test_rows=2000", "synth.card_scale=0.01",
              "train.batch_size=256", "train.epochs=2", "model.hidden_units=[64,64]",
              "train.tensorboard=false", "train.threads=1", "--quiet"]
    assert main(["synth", *common]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["ceiling_auc"]["valid"] > 0.7
    assert main(["prepare", *common]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["train"]["rows_written"] == 6000
    assert main(["train", *common, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["samples"] == 12000 and m["samples_per_s"] > 0 and 0.5 < m["test"]["auc"] <= 1
    assert (run / "metrics.json").is_file() and (run / "curves.png").is_file()
    assert main(["train", *common]) == 2       # refuses to clobber the finished run
    assert "not empty" in capsys.readouterr().err
    assert main(["eval", *common, "--json"]) == 0
    e = json.loads(capsys.readouterr().out)
    assert e["test"] == m["test"] and e["checkpoint"].endswith("best.pt")
