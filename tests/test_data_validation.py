"""Raw-input validation: a bad value is a one-line DataError naming file, line and field (exit 2),
or with data.skip_bad_rows a counted skip; every input row is read, then written or skipped."""
import bz2
import codecs
import gzip
import random
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from ctrkit.cli import main
from ctrkit.data.preprocess import prepare
from ctrkit.data.shards import load_shard
from ctrkit.errors import DataError
from tests.conftest import CRITEO, LAPIS_AVAZU, LAPIS_CRITEO

pytestmark = pytest.mark.shared_data

SAMPLE = CRITEO / "shenweichen_DeepCTR" / "criteo_sample.txt"   # comma, header, float values
TINY = CRITEO / "ChenglongChen_kaggle-2014-criteo" / "train.tiny.csv"   # comma, header Id,Label,..


def _criteo(n=20):
    return (LAPIS_CRITEO / "train.csv").read_text().splitlines()[:n]   # tab, no header


def _avazu(n=20):
    return (LAPIS_AVAZU / "dev.csv").read_text().splitlines()[:n]      # comma, no header


def _set(lines, i, col, value, delim="\t"):
    f = lines[i].split(delim)
    f[col] = value
    lines[i] = delim.join(f)


def _write(tmp_path, lines, name="in.tsv"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def _cli(capsys, tmp_path, path, *extra):
    code = main(["prepare", f"data.train={path}", f"data.prepared_dir={tmp_path / 'out'}",
                 "--quiet", *extra])
    return code, capsys.readouterr().err.strip()


def _fails(capsys, tmp_path, path, *extra):
    code, err = _cli(capsys, tmp_path, path, *extra)
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _generic_features():
    return [{"name": f"I{i}", "type": "numeric", "transform": "log"} for i in range(1, 14)] + \
           [{"name": f"C{i}", "type": "categorical"} for i in range(1, 27)]


def _exact(info, read):
    assert info.rows_read == read
    assert info.rows_read == info.rows_written + info.rows_skipped


# ---------------------------------------------------------------- 1. non-finite numbers

@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "Infinity"])
def test_non_finite_number_is_bad_value(capsys, tmp_path, value):
    lines = _criteo()
    _set(lines, 11, 3, value)
    p = _write(tmp_path, lines)
    err = _fails(capsys, tmp_path, p)
    assert f"{p}:12 field I3: not a finite number: '{value}'" in err


def test_non_finite_with_criteo_bucket(capsys, tmp_path):
    lines = _criteo()
    _set(lines, 2, 5, "inf")
    p = _write(tmp_path, lines)
    err = _fails(capsys, tmp_path, p, "data.dense_transform=criteo_bucket")
    assert f"{p}:3 field I5: not a finite number: 'inf'" in err


@pytest.mark.parametrize("fmt", ["criteo_csv", "csv"])
def test_non_finite_in_csv_formats(make_cfg, tmp_path, fmt):
    lines = SAMPLE.read_text().splitlines()
    _set(lines, 7, 2, "1e400", ",")     # file line 8 (after the header), column I2
    p = _write(tmp_path, lines, "in.csv")
    extra = {"features": _generic_features()} if fmt == "csv" else {}
    with pytest.raises(DataError) as e:
        prepare(make_cfg({"format": fmt, "train": str(p), **extra}), progress=False)
    assert str(e.value) == f"{p}:8 field I2: not a finite number: '1e400'"


def test_non_finite_in_parquet(make_cfg, tmp_path):
    table = pacsv.read_csv(SAMPLE)
    i3 = table.column("I3").to_numpy(zero_copy_only=False).copy()
    i3[5] = np.inf
    table = table.set_column(table.schema.get_field_index("I3"), "I3", pa.array(i3))
    p = tmp_path / "in.parquet"
    pq.write_table(table, p)
    cfg = {"format": "parquet", "train": str(p), "features": _generic_features()}
    with pytest.raises(DataError) as e:
        prepare(make_cfg(cfg), progress=False)
    assert str(e.value) == f"{p}:6 field I3: not a finite number: 'inf'"
    s = prepare(make_cfg({**cfg, "skip_bad_rows": True}), progress=False)
    info = s.splits["train"]
    assert info.skipped == {"non_finite": 1} and info.rows_written == 199
    _exact(info, 200)


def test_skip_mode_counts_non_finite(make_cfg, tmp_path):
    lines = _criteo()
    _set(lines, 1, 1, "inf")
    _set(lines, 4, 13, "1e400")
    _set(lines, 8, 2, "-inf")
    p = _write(tmp_path, lines)
    s = prepare(make_cfg({"train": str(p), "skip_bad_rows": True}), progress=False)
    info = s.splits["train"]
    assert info.skipped == {"non_finite": 3} and info.rows_written == 17
    _exact(info, 20)


def test_nan_and_empty_stay_missing(make_cfg, tmp_path):
    lines = _criteo()
    for i, v in [(1, "nan"), (2, "NaN"), (3, "")]:
        _set(lines, i, 3, v)
    p = _write(tmp_path, lines)
    s = prepare(make_cfg({"train": str(p)}), progress=False)
    _exact(s.splits["train"], 20)
    sh = load_shard(s.root, s.splits["train"].shards[0])
    i3 = [f.name for f in s.dense].index("I3")
    assert (sh.dense[1:4, i3] == 0).all() and np.isfinite(sh.dense).all()


# ---------------------------------------------------------------- 2. Avazu hour

@pytest.mark.parametrize("value", ["abc", "14102199", "1410210", "14023000", "141021000"])
def test_avazu_bad_hour(capsys, tmp_path, value):
    lines = _avazu()
    _set(lines, 3, 2, value, ",")
    p = _write(tmp_path, lines, "in.csv")
    err = _fails(capsys, tmp_path, p, "data.format=avazu_csv")
    assert f"{p}:4 field hour: not a YYMMDDHH date-hour: '{value}'" in err


def test_avazu_bad_hour_skipped(make_cfg, tmp_path):
    lines = _avazu()
    _set(lines, 3, 2, "abc", ",")
    _set(lines, 9, 2, "14102199", ",")
    p = _write(tmp_path, lines, "in.csv")
    s = prepare(make_cfg({"format": "avazu_csv", "train": str(p), "skip_bad_rows": True}),
                progress=False)
    info = s.splits["train"]
    assert info.skipped == {"bad_hour": 2} and info.rows_written == 18
    _exact(info, 20)


# ---------------------------------------------------------------- 3. zero-row parquet

def test_zero_row_parquet(make_cfg, tmp_path):
    p = tmp_path / "empty.parquet"
    pq.write_table(pacsv.read_csv(SAMPLE).slice(0, 0), p)
    with pytest.raises(DataError) as e:
        prepare(make_cfg({"format": "parquet", "train": str(p), "features": _generic_features()}),
                progress=False)
    assert str(e.value) == f"{p}: file has no data rows"


# ---------------------------------------------------------------- 4. quotes

def test_quotes_are_literal_in_criteo_tsv(make_cfg, capsys, tmp_path):
    lines = _criteo()
    _set(lines, 2, 18, '"abc')       # C5 of line 3 opens a "quote" ...
    _set(lines, 5, 18, 'def"')       # ... that line 6 "closes"
    p = _write(tmp_path, lines)
    s = prepare(make_cfg({"train": str(p)}), progress=False)
    _exact(s.splits["train"], 20)
    assert s.splits["train"].rows_written == 20
    _set(lines, 4, 2, '"5')
    p = _write(tmp_path, lines, "num.tsv")
    assert f"{p}:5 field I2: not a number: '\"5'" in _fails(capsys, tmp_path, p)


@pytest.mark.parametrize("fmt", ["avazu_csv", "criteo_csv"])
def test_quotes_are_literal_in_fixed_csv_formats(make_cfg, tmp_path, fmt):
    lines = _avazu() if fmt == "avazu_csv" else SAMPLE.read_text().splitlines()[:21]
    col = 5 if fmt == "avazu_csv" else 20
    _set(lines, 2, col, '"abc', ",")
    _set(lines, 6, col, 'def"', ",")
    p = _write(tmp_path, lines, "in.csv")
    s = prepare(make_cfg({"format": fmt, "train": str(p)}), progress=False)
    _exact(s.splits["train"], 20)
    assert s.splits["train"].rows_written == 20


# ---------------------------------------------------------------- 5. accounting

def _with_bad_rows(n, seed):
    lines = _criteo(n)
    rng = random.Random(seed)
    a, b, c, d, e = rng.sample(range(n), 5)
    lines[a] = "\t".join(lines[a].split("\t")[:-3])     # too few columns
    lines[b] += "\textra"                              # too many
    lines[c] = "7" + lines[c][1:]                      # bad label
    lines[d] = "x" + lines[d][1:]
    _set(lines, e, 4, "oops")                          # non-numeric
    return lines


def test_skip_mode_accounting_is_exact(make_cfg, tmp_path):
    train = _write(tmp_path, _with_bad_rows(300, 1), "train.tsv")
    valid = tmp_path / "valid.tsv.gz"
    valid.write_bytes(gzip.compress(("\n".join(_with_bad_rows(120, 2)) + "\n").encode()))
    s = prepare(make_cfg({"train": str(train), "valid": str(valid), "skip_bad_rows": True}),
                progress=False)
    for split, n in [("train", 300), ("valid", 120)]:
        info = s.splits[split]
        assert info.skipped == {"wrong_column_count": 2, "bad_label": 2, "non_numeric": 1}
        assert info.rows_written == n - 5
        _exact(info, n)
        assert sum(load_shard(s.root, sh).rows for sh in info.shards) == n - 5


# ---------------------------------------------------------------- 6. undecodable input

def test_binary_file(capsys, tmp_path):
    p = tmp_path / "noise.tsv"
    p.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(5000)))
    assert str(p) in _fails(capsys, tmp_path, p)


@pytest.mark.parametrize("line,col", [(1, 20), (15, 20), (15, 2)])
def test_non_utf8_names_the_line(capsys, tmp_path, line, col):
    lines = _criteo()
    _set(lines, line - 1, col, "\udcff")    # one raw 0xff byte
    p = tmp_path / "latin.tsv"
    p.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    assert f"{p}:{line}: not valid UTF-8 text" in _fails(capsys, tmp_path, p)


def test_gzip_and_bz2_are_read_whatever_the_name(make_cfg, tmp_path):
    data = ("\n".join(_criteo()) + "\n").encode()
    blobs = [("gz.tsv", gzip.compress(data)), ("in.tsv.bz2", bz2.compress(data)),
             ("bz.tsv", bz2.compress(data))]
    for i, (name, blob) in enumerate(blobs):
        p = tmp_path / name
        p.write_bytes(blob)
        s = prepare(make_cfg({"train": str(p), "prepared_dir": str(tmp_path / f"p{i}")}),
                    progress=False)
        _exact(s.splits["train"], 20)
        assert s.splits["train"].rows_written == 20


def test_bad_row_in_bz2_names_the_line(capsys, tmp_path):
    lines = _criteo()
    lines[13] = "2" + lines[13][1:]
    p = tmp_path / "bad.tsv.bz2"
    p.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    assert f"{p}:14 field label: label must be 0 or 1, got '2'" in _fails(capsys, tmp_path, p)
    cut = tmp_path / "cut.tsv.bz2"
    data = bz2.compress((LAPIS_CRITEO / "train.csv").read_bytes())
    cut.write_bytes(data[: len(data) // 2])
    err = _fails(capsys, tmp_path, cut)
    assert str(cut) in err and "truncated" in err


def test_zip_is_refused(capsys, tmp_path):
    p = tmp_path / "in.tsv"
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as z:
        z.writestr("in.tsv", "\n".join(_criteo()) + "\n")
    p.write_bytes((tmp_path / "z.zip").read_bytes())
    assert f"{p}: zip compressed data is not supported" in _fails(capsys, tmp_path, p)


# ---------------------------------------------------------------- 7. every row skipped

def test_every_row_skipped(capsys, tmp_path):
    p = _write(tmp_path, ["7" + line[1:] for line in _criteo()], "bad.tsv")
    err = _fails(capsys, tmp_path, p, "data.skip_bad_rows=true")
    assert f"{p}: every row was skipped (bad_label 20)" in err
    good = _write(tmp_path, _criteo(), "good.tsv")
    err = _fails(capsys, tmp_path, good, f"data.valid={p}", "data.skip_bad_rows=true")
    assert f"{p}: every row was skipped (bad_label 20)" in err


# ---------------------------------------------------------------- 8. wrong delimiter

def test_wrong_delimiter_is_named(make_cfg, capsys, tmp_path):
    hint = "(is the delimiter ','? the line contains ';')"
    lines = [line.replace(",", ";") for line in SAMPLE.read_text().splitlines()[:21]]
    p = _write(tmp_path, lines, "semi.csv")
    cfg = {"format": "csv", "train": str(p), "features": _generic_features()}
    with pytest.raises(DataError) as e:
        prepare(make_cfg(cfg), progress=False)
    assert str(e.value).startswith(f"{p}:1: header lacks columns") and hint in str(e.value)
    headerless = _write(tmp_path, lines[1:], "semi2.csv")
    with pytest.raises(DataError) as e:
        prepare(make_cfg({**cfg, "train": str(headerless), "header": False}), progress=False)
    assert str(e.value) == f"{headerless}:1: expected 40 columns, got 1 {hint}"
    tsv = _write(tmp_path, [line.replace("\t", ";") for line in _criteo()], "semi.tsv")
    err = _fails(capsys, tmp_path, tsv, "data.format=criteo_csv")
    assert f"{tsv}:1: header lacks Criteo columns" in err and hint in err


# ---------------------------------------------------------------- 9. byte order mark

@pytest.mark.parametrize("fmt,src", [("criteo_tsv", LAPIS_CRITEO / "dev.csv"),
                                     ("criteo_csv", SAMPLE), ("criteo_csv", TINY),
                                     ("avazu_csv", LAPIS_AVAZU / "train.csv")])
def test_bom_prepares_like_no_bom(make_cfg, tmp_path, fmt, src):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(codecs.BOM_UTF8 + src.read_bytes())
    schemas = [prepare(make_cfg({"format": fmt, "train": str(path),
                                 "prepared_dir": str(tmp_path / name)}), progress=False)
               for name, path in [("plain", src), ("bom", bom)]]
    a, b = (s.splits["train"] for s in schemas)
    assert a.rows_written == b.rows_written > 0 and b.rows_skipped == 0
    assert [f.name for f in schemas[0].features] == [f.name for f in schemas[1].features]
    for x, y in zip(a.shards, b.shards):
        sa, sb = load_shard(schemas[0].root, x), load_shard(schemas[1].root, y)
        assert np.array_equal(sa.sparse, sb.sparse) and np.array_equal(sa.dense, sb.dense)
        assert np.array_equal(sa.labels, sb.labels)
    for f in schemas[0].sparse:
        va = (schemas[0].root / "vocab" / f"{f.name}.arrow").read_bytes()
        assert va == (schemas[1].root / "vocab" / f"{f.name}.arrow").read_bytes()


# ---------------------------------------------------------------- huge finite numbers

def test_huge_finite_numbers(make_cfg, capsys, tmp_path):
    lines = _criteo()
    _set(lines, 3, 2, "-1e30")
    _set(lines, 6, 4, "1e39")       # finite, beyond float32
    p = _write(tmp_path, lines)
    s = prepare(make_cfg({"train": str(p), "dense_transform": "criteo_bucket",
                          "prepared_dir": str(tmp_path / "b")}), progress=False)
    i2 = pa.ipc.open_file(str(s.root / "vocab" / "I2.arrow")).read_all().column("value")
    assert min(int(v) for v in i2.to_pylist()) > np.iinfo(np.int64).min   # no int64 overflow
    s = prepare(make_cfg({"train": str(p), "dense_transform": "log",
                          "prepared_dir": str(tmp_path / "l")}), progress=False)
    sh = load_shard(s.root, s.splits["train"].shards[0])
    i4 = [f.name for f in s.dense].index("I4")
    assert np.isfinite(sh.dense).all() and abs(sh.dense[6, i4] - np.log1p(1e39)) < 1e-3
    err = _fails(capsys, tmp_path, p, "data.dense_transform=none")
    assert f"{p}:7 field I4: '1e39' does not fit in float32" in err


def test_a_value_beyond_float32_names_file_line_and_field(capsys, tmp_path):
    from ctrkit.cli import main
    from tests.conftest import LAPIS_CRITEO
    lines = (LAPIS_CRITEO / "train.csv").read_text().splitlines()[:20]
    f = lines[7].split("\t")
    f[4] = "1e300"
    lines[7] = "\t".join(f)
    p = tmp_path / "big.tsv"
    p.write_text("\n".join(lines) + "\n")
    code = main(["prepare", f"data.train={p}", f"data.prepared_dir={tmp_path / 'out'}",
                 "data.dense_transform=none", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{p}:8 field I4: '1e300' does not fit in float32" in err
    assert main(["prepare", f"data.train={p}", f"data.prepared_dir={tmp_path / 'out2'}",
                 "--quiet"]) == 0   # (the log transform takes it)


def test_an_unclosed_quote_is_reported_where_its_row_starts(capsys, tmp_path):
    from ctrkit.cli import main
    p = tmp_path / "q.csv"
    rows = ["label,a,b"] + [f"{i % 2},x{i},{i}.0" for i in range(30)]
    rows[5] = '1,"x5,5.0'
    p.write_text("\n".join(rows) + "\n")
    code = main(["prepare", "data.format=csv", f"data.train={p}",
                 f"data.prepared_dir={tmp_path / 'out'}", "--quiet",
                 "data.features=[{name: a, type: categorical}, {name: b, type: numeric}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{p}:6:" in err, err
