"""`ctrkit predict` and `Predictor`: new rows scored exactly as in-training evaluation scores them."""
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ctrkit.cli import main
from ctrkit.config import load_config
from ctrkit.data.loader import BatchLoader
from ctrkit.data.schema import Schema
from ctrkit.metrics import predict as eval_predict
from ctrkit.serving.predict import Predictor
from ctrkit.train.run import train
from tests.conftest import CONFIGS, LAPIS_AVAZU, LAPIS_CRITEO

pytestmark = pytest.mark.shared_data

SLICES = {"criteo": ("criteo_sample.yaml", LAPIS_CRITEO), "avazu": ("avazu_sample.yaml", LAPIS_AVAZU)}


def _trained(name, tmp_path, steps=30):
    config, _ = SLICES[name]
    cfg = load_config(CONFIGS / config, [f"data.prepared_dir={tmp_path / 'prep'}",
                                         f"train.run_dir={tmp_path / 'run'}", "train.progress=false",
                                         "train.tensorboard=false", "train.plot=false",
                                         "train.threads=1", f"train.max_steps={steps}",
                                         "train.eval_every=0"])
    res = train(cfg)
    return cfg, res.run_dir


def _reference(cfg, predictor, split):
    """The scores in-training evaluation gives: the prepared split through the BatchLoader."""
    schema = Schema.load(cfg.data.prepared_dir)
    return eval_predict(predictor.model, BatchLoader(schema, split, 1000, prefetch=0))


@pytest.fixture(scope="module")
def criteo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("criteo")
    return _trained("criteo", tmp) + (tmp,)


@pytest.mark.parametrize("name", ["criteo", "avazu"])
def test_predict_on_the_validation_file_equals_evaluation(name, tmp_path, criteo_run):
    cfg, run_dir, _ = criteo_run if name == "criteo" else _trained(name, tmp_path) + (None,)
    p = Predictor.load(run_dir)
    y, ref = _reference(cfg, p, "valid")
    out = tmp_path / "scores.parquet"
    s = p.predict_files([str(SLICES[name][1] / "dev.csv")], out, progress=False)
    got = pq.read_table(out).column("probability").to_numpy()
    assert s.rows_read == s.rows_written == len(ref) and s.rows_skipped == 0
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert abs(s.metrics["auc"] - _auc(y, ref)) < 1e-9 and s.metrics["rows"] == len(ref)


def _auc(y, p):
    from ctrkit.metrics import auc_logloss
    return auc_logloss(y, p)["auc"]


def test_a_file_without_labels_scores_and_the_run_moves(criteo_run, tmp_path):
    cfg, run_dir, _ = criteo_run
    moved = tmp_path / "moved_run"
    shutil.copytree(run_dir, moved)        # another machine: no prepared folder needed
    raw = (LAPIS_CRITEO / "dev.csv").read_text().splitlines()
    nolabel = tmp_path / "new.tsv"
    nolabel.write_text("".join(line.split("\t", 1)[1] + "\n" for line in raw[:300]))
    p = Predictor.load(moved)
    out = tmp_path / "new.csv"
    s = p.predict_files([str(nolabel)], out, progress=False)
    assert s.metrics is None and s.rows_written == 300
    ref = _reference(cfg, Predictor.load(run_dir), "valid")[1][:300]
    np.testing.assert_allclose(pd.read_csv(out)["probability"].to_numpy(), ref, atol=1e-6)


def _dev_frame(nrows: int) -> pd.DataFrame:
    """The first rows of the Criteo slice's dev.csv as a DataFrame (categoricals as text)."""
    cols = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    return pd.read_csv(LAPIS_CRITEO / "dev.csv", sep="\t", header=None, names=cols, nrows=nrows,
                       dtype={c: str for c in cols if c.startswith("C")})


def test_the_python_api_takes_frames_tables_and_dicts(criteo_run):
    cfg, run_dir, _ = criteo_run
    p = Predictor.load(run_dir)
    df = _dev_frame(200)
    ref = _reference(cfg, p, "valid")[1][:200]
    np.testing.assert_allclose(p.predict(df), ref, atol=1e-6)
    np.testing.assert_allclose(p.predict(df.drop(columns="label").to_dict("records")), ref,
                               atol=1e-6)
    unseen = df.head(3).copy()
    unseen["C3"] = "never-seen"                    # out of vocabulary: scores, differently
    assert p.predict(unseen).shape == (3,)


def test_cli_predict_passes_an_id_column_through_and_refuses_to_overwrite(criteo_run, tmp_path):
    _, run_dir, _ = criteo_run
    src = tmp_path / "with_id.csv"
    cols = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    df = pd.read_csv(LAPIS_CRITEO / "dev.csv", sep="\t", header=None, names=cols, nrows=50,
                     dtype=str)
    df.insert(0, "request_id", [f"r{i}" for i in range(50)])
    df.to_csv(src, sep="\t", index=False)
    out = tmp_path / "out.parquet"
    assert main(["predict", str(run_dir), "--input", str(src), "--output", str(out),
                 "--columns", "request_id", "--quiet"]) == 0
    t = pq.read_table(out)
    assert t.column_names == ["request_id", "probability"]
    assert t.column("request_id").to_pylist() == [f"r{i}" for i in range(50)]
    before = out.read_bytes()
    assert main(["predict", str(run_dir), "--input", str(src), "--output", str(out)]) == 2
    assert out.read_bytes() == before


def test_bad_input_is_one_line(criteo_run, tmp_path, capsys):
    _, run_dir, _ = criteo_run
    raw = (LAPIS_CRITEO / "dev.csv").read_text().splitlines()
    bad = tmp_path / "bad.tsv"
    fields = raw[3].split("\t")
    fields[2] = "abc"                                # I2 not a number, line 4
    bad.write_text("\n".join(raw[:3] + ["\t".join(fields)] + raw[4:10]) + "\n")
    out = tmp_path / "o.csv"
    assert main(["predict", str(run_dir), "--input", str(bad), "--output", str(out),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.tsv:4" in err and "I2" in err
    assert not out.exists() and not list(tmp_path.glob(".o.csv*"))
    assert main(["predict", str(run_dir), "--input", str(bad), "--output", str(out),
                 "--skip-bad-rows", "--quiet", "--json"]) == 0
    assert len(pd.read_csv(out)) == 9
    missing = tmp_path / "missing.csv"
    pd.DataFrame({"I1": [1], "C1": ["a"]}).to_csv(missing, index=False)
    assert main(["predict", str(run_dir), "--input", str(missing), "--output",
                 str(tmp_path / "m.csv"), "--quiet"]) == 2
    assert "lacks" in capsys.readouterr().err
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert main(["predict", str(run_dir), "--input", str(empty), "--output",
                 str(tmp_path / "e.parquet"), "--quiet"]) == 0
    assert pq.read_table(tmp_path / "e.parquet").num_rows == 0


def test_a_run_without_scoring_data_is_one_line(criteo_run, tmp_path):
    _, run_dir, _ = criteo_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    shutil.rmtree(old / "data")
    with pytest.raises(Exception, match="no data/schema.json"):
        Predictor.load(old)


def test_a_run_from_an_incompatible_version_is_one_line(criteo_run, tmp_path, capsys):
    import json
    _, run_dir, _ = criteo_run
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    schema = json.loads((old / "data" / "schema.json").read_text())
    schema["version"] = 1
    (old / "data" / "schema.json").write_text(json.dumps(schema))
    out = tmp_path / "o.csv"
    assert main(["predict", str(old), "--input", str(LAPIS_CRITEO / "dev.csv"), "--output",
                 str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another ctrkit version" in err
    (old / "config.yaml").write_text((old / "config.yaml").read_text() + "\nnew_section: {a: 1}\n")
    with pytest.raises(Exception, match="does not load with this ctrkit version"):
        Predictor.load(old)


def test_the_python_api_checks_values_as_files_are_checked(criteo_run):
    cfg, run_dir, _ = criteo_run
    p = Predictor.load(run_dir)
    cols = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    df = pd.read_csv(LAPIS_CRITEO / "dev.csv", sep="\t", header=None, names=cols, nrows=50,
                     dtype=str, keep_default_na=False)        # empty fields as "", not NaN
    ref = _reference(cfg, p, "valid")[1][:50]
    np.testing.assert_allclose(p.predict(df), ref, atol=1e-6)
    bad = df.copy()
    bad.loc[1, "I2"] = "x"
    bad.loc[2, "I3"] = " 5 "                                   # spaces around a number are fine
    with pytest.raises(Exception, match=r"rows:2 field I2: not a number: 'x'"):
        p.predict(bad)
    got = p.predict(bad, skip_bad_rows=True)            # row 2 skipped; row 3's " 5 " is 5
    assert len(got) == 49
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
    np.testing.assert_allclose(got[2:], ref[3:], atol=1e-6)
    assert p.predict(pd.DataFrame()).shape == (0,)


def test_a_passthrough_column_that_is_not_there_is_one_line(criteo_run, tmp_path, capsys):
    _, run_dir, _ = criteo_run
    out = tmp_path / "o.parquet"
    assert main(["predict", str(run_dir), "--input", str(LAPIS_CRITEO / "dev.csv"), "--output",
                 str(out), "--columns", "nosuch", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--columns nosuch: not a column of" in err
    assert not out.exists()


def test_bf16_precision_scores_close_to_fp32_and_a_bad_one_is_refused(criteo_run, tmp_path):
    """precision=bf16 runs the matrix products in bfloat16: the same rows, scores within 1e-2 of
    fp32 and AUC within 0.01, but not the exact fp32 scores; an unknown precision is one line."""
    from ctrkit.errors import CtrkitError
    _, run_dir, _ = criteo_run
    src = [str(LAPIS_CRITEO / "dev.csv")]
    fp32 = Predictor.load(run_dir).predict_files(src, tmp_path / "a.parquet", progress=False)
    bf16 = Predictor.load(run_dir, precision="bf16")
    s = bf16.predict_files(src, tmp_path / "b.parquet", progress=False)
    a = pq.read_table(tmp_path / "a.parquet").column("probability").to_numpy()
    b = pq.read_table(tmp_path / "b.parquet").column("probability").to_numpy()
    assert s.rows_written == fp32.rows_written == len(a)
    assert 0 < np.abs(a - b).max() < 1e-2
    assert abs(s.metrics["auc"] - fp32.metrics["auc"]) < 0.01
    with pytest.raises(CtrkitError, match="precision 'fp8': expected one of fp32, bf16"):
        Predictor.load(run_dir, precision="fp8")


@pytest.mark.parametrize("precision, scoring", [("bf16", 2), ("fp32", 3)])
def test_bf16_scoring_leaves_the_reader_a_thread_and_the_count_is_restored(
        criteo_run, tmp_path, monkeypatch, precision, scoring):
    import torch
    _, run_dir, _ = criteo_run
    p = Predictor.load(run_dir, precision=precision)
    seen = []
    score = p._score
    monkeypatch.setattr(p, "_score", lambda *a: seen.append(torch.get_num_threads()) or score(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        p.predict_files([str(LAPIS_CRITEO / "dev.csv")], tmp_path / "s.parquet", progress=False)
        assert seen and set(seen) == {scoring}
        assert torch.get_num_threads() == 3
        seen.clear()   # rows through the API (a server's threads): the count is left alone
        p.predict(_dev_frame(50))
        assert set(seen) == {3}
    finally:
        torch.set_num_threads(before)
