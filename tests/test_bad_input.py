"""Bad input: one line naming file, line and field, exit status 2, never a traceback."""
import gzip

import pytest

from ctrkit.cli import main
from tests.conftest import LAPIS_AVAZU, LAPIS_CRITEO

pytestmark = pytest.mark.shared_data


def _lines(n=20):
    return (LAPIS_CRITEO / "train.csv").read_text().splitlines()[:n]


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _write(tmp_path, lines, name="bad.tsv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def _prepare(capsys, tmp_path, path, *extra):
    return _run(capsys, "prepare", f"data.train={path}", f"data.prepared_dir={tmp_path / 'out'}",
                "--quiet", *extra)


def test_wrong_column_count(capsys, tmp_path):
    lines = _lines()
    lines[6] = "\t".join(lines[6].split("\t")[:-3])
    p = _write(tmp_path, lines)
    code, err = _prepare(capsys, tmp_path, p)
    assert code == 2
    assert f"{p}:7: expected 40 columns, got 37" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_non_numeric_in_numeric_column(capsys, tmp_path):
    lines = _lines()
    f = lines[11].split("\t")
    f[3] = "abc"
    lines[11] = "\t".join(f)
    p = _write(tmp_path, lines)
    code, err = _prepare(capsys, tmp_path, p)
    assert code == 2
    assert f"{p}:12 field I3: not a number: 'abc'" in err


def test_label_not_binary(capsys, tmp_path):
    lines = _lines()
    lines[4] = "2" + lines[4][1:]
    p = _write(tmp_path, lines)
    code, err = _prepare(capsys, tmp_path, p)
    assert code == 2
    assert f"{p}:5 field label: label must be 0 or 1, got '2'" in err


def test_skip_bad_rows_counts_every_skip(tmp_path, make_cfg):
    from ctrkit.data.preprocess import prepare
    lines = _lines(30)
    lines[2] = "7" + lines[2][1:]                                   # bad label
    lines[5] = "\t".join(lines[5].split("\t")[:10])                 # wrong column count
    f = lines[9].split("\t"); f[1] = "x1"; lines[9] = "\t".join(f)  # non-numeric
    p = _write(tmp_path, lines)
    s = prepare(make_cfg({"format": "criteo_tsv", "train": str(p), "skip_bad_rows": True}),
                progress=False)
    info = s.splits["train"]
    assert info.rows_written == 27
    assert info.skipped == {"bad_label": 1, "wrong_column_count": 1, "non_numeric": 1}
    assert info.rows_read == 30 == info.rows_written + info.rows_skipped


def test_empty_file(capsys, tmp_path):
    p = tmp_path / "empty.tsv"
    p.write_text("")
    code, err = _prepare(capsys, tmp_path, p)
    assert code == 2 and f"{p}: file is empty" in err


def test_truncated_gzip(capsys, tmp_path):
    data = gzip.compress((LAPIS_CRITEO / "train.csv").read_bytes())
    p = tmp_path / "cut.tsv.gz"
    p.write_bytes(data[: len(data) // 2])
    code, err = _prepare(capsys, tmp_path, p)
    assert code == 2 and str(p) in err and "truncated" in err
    assert "Traceback" not in err


def test_missing_file(capsys, tmp_path):
    code, err = _prepare(capsys, tmp_path, tmp_path / "nope.tsv")
    assert code == 2 and "nope.tsv: file not found" in err


def test_unknown_model_name(capsys, tmp_path):
    code, err = _run(capsys, "train", f"data.train={LAPIS_CRITEO / 'dev.csv'}",
                     f"data.prepared_dir={tmp_path / 'p'}", f"train.run_dir={tmp_path / 'r'}",
                     "model.name=deepffm", "--quiet")
    assert code == 2
    assert "unknown model 'deepffm'" in err and "deepfm" in err


def test_unknown_config_key(capsys):
    code, err = _run(capsys, "train", "train.epocs=3")
    assert code == 2 and "unknown key 'train.epocs'" in err


def test_prepare_refuses_non_empty_output_and_never_touches_input(capsys, tmp_path):
    src = _write(tmp_path, _lines(), "in.tsv")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = _prepare(capsys, tmp_path, src)
    assert code == 2 and "is not empty" in err
    code, err = _prepare(capsys, tmp_path, src, "data.overwrite=true")
    assert code == 2 and "not a ctrkit prepared folder" in err
    assert (out / "notes.txt").read_text() == "mine"
    # an output folder that holds the input is refused
    code, err = _run(capsys, "prepare", f"data.train={src}", f"data.prepared_dir={tmp_path}",
                     "data.overwrite=true", "--quiet")
    assert code == 2 and "contains input file" in err
    assert src.is_file()


def test_prepare_overwrite_replaces_own_output(capsys, tmp_path):
    src = _write(tmp_path, _lines(), "in.tsv")
    assert _prepare(capsys, tmp_path, src)[0] == 0
    before = (tmp_path / "out" / "schema.json").stat().st_mtime_ns
    assert _prepare(capsys, tmp_path, src)[0] == 0    # up to date: reused as it is
    assert (tmp_path / "out" / "schema.json").stat().st_mtime_ns == before
    assert _prepare(capsys, tmp_path, src, "data.overwrite=true")[0] == 0
    assert (tmp_path / "out" / "schema.json").stat().st_mtime_ns != before


def test_avazu_wrong_column_count(capsys, tmp_path):
    lines = (LAPIS_AVAZU / "dev.csv").read_text().splitlines()[:10]
    lines[3] += ",extra"
    p = _write(tmp_path, lines, "bad.csv")
    code, err = _run(capsys, "prepare", "data.format=avazu_csv", f"data.train={p}",
                     f"data.prepared_dir={tmp_path / 'out'}", "--quiet")
    assert code == 2 and f"{p}:4: expected 24 columns, got 25" in err


def test_diverged_training_is_one_line(capsys, tmp_path):
    code, err = _run(capsys, "train", f"data.train={LAPIS_CRITEO / 'dev.csv'}",
                     f"data.prepared_dir={tmp_path / 'p'}", f"train.run_dir={tmp_path / 'r'}",
                     "optimizer.dense.lr=1e30", "optimizer.sparse.lr=1e30", "train.log_every=1",
                     "train.batch_size=256", "train.device=cpu", "--quiet")
    assert code == 2 and "training diverged" in err and "lower the learning rate" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
