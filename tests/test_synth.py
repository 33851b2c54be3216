"""Tests of the synthetic Criteo-like generator (small vocabularies keep them fast)."""
from __future__ import annotations

import json
import re

import pytest

from ctrkit.data.synth import write_synthetic
from ctrkit.errors import ConfigError, CtrkitError

SMALL = dict(max_card=5000, progress=False)
HEX8 = re.compile(rb"[0-9a-f]{8}")
INT = re.compile(rb"0|[1-9][0-9]*")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    meta = write_synthetic(out, 20_000, valid_rows=3000, test_rows=2000, seed=7, pos_rate=0.3, **SMALL)
    return out, meta


def test_files_and_format(generated):
    out, meta = generated
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".ctrkit-")) == \
        ["meta.json", "test.tsv", "train.tsv", "valid.tsv"]
    assert (out / ".ctrkit-manifest.json").is_file()   # what overwrite may replace
    for name, n in (("train", 20_000), ("valid", 3000), ("test", 2000)):
        lines = (out / f"{name}.tsv").read_bytes().split(b"\n")
        assert lines[-1] == b""
        lines = lines[:-1]
        assert len(lines) == n
        for line in lines[:2000]:
            fields = line.split(b"\t")
            assert len(fields) == 40
            assert fields[0] in (b"0", b"1")
            assert all(f == b"" or INT.fullmatch(f) for f in fields[1:14])
            assert all(f == b"" or HEX8.fullmatch(f) for f in fields[14:])
    assert json.loads((out / "meta.json").read_text()) == meta


def test_meta_and_positive_rate(generated):
    out, meta = generated
    assert meta["format"] == "criteo_tsv" and meta["seed"] == 7
    assert meta["rows"] == {"train": 20_000, "valid": 3000, "test": 2000}
    assert len(meta["cardinalities"]) == 26 and max(meta["cardinalities"]) == 5000
    assert min(meta["cardinalities"]) >= 2
    labels = [line[:1] for line in (out / "train.tsv").read_bytes().splitlines()]
    assert set(labels) == {b"0", b"1"}
    rate = labels.count(b"1") / len(labels)
    assert abs(rate - 0.3) < 0.05
    assert meta["pos_rate"]["train"] == pytest.approx(rate)
    for split in ("train", "valid", "test"):
        assert meta["ceiling_auc"][split] > 0.7
        assert 0 < meta["ceiling_logloss"][split] < 0.6


def test_deterministic_and_seed_dependent(tmp_path):
    a = write_synthetic(tmp_path / "a", 3000, valid_rows=500, seed=3, **SMALL)
    b = write_synthetic(tmp_path / "b", 3000, valid_rows=500, seed=3, **SMALL)
    c = write_synthetic(tmp_path / "c", 3000, valid_rows=500, seed=4, **SMALL)
    assert a == b
    for name in ("train.tsv", "valid.tsv", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.tsv").read_bytes() != (tmp_path / "c" / "train.tsv").read_bytes()
    # splits use different streams
    valid = (tmp_path / "a" / "valid.tsv").read_bytes()
    assert valid != (tmp_path / "a" / "train.tsv").read_bytes()[:len(valid)]
    assert not (tmp_path / "a" / "test.tsv").exists()


def test_refuses_to_overwrite(tmp_path):
    write_synthetic(tmp_path, 200, **SMALL)
    before = (tmp_path / "train.tsv").read_bytes()
    with pytest.raises(CtrkitError, match="exists; pass overwrite=true"):
        write_synthetic(tmp_path, 300, seed=1, **SMALL)
    assert (tmp_path / "train.tsv").read_bytes() == before
    # refused before anything is written: the new valid split is not created either
    with pytest.raises(CtrkitError, match="exists"):
        write_synthetic(tmp_path, 200, valid_rows=10, **SMALL)
    assert not (tmp_path / "valid.tsv").exists()
    meta = write_synthetic(tmp_path, 300, seed=1, overwrite=True, **SMALL)
    assert meta["rows"]["train"] == 300
    assert len((tmp_path / "train.tsv").read_bytes().splitlines()) == 300


@pytest.mark.parametrize("kwargs", [
    dict(rows=0), dict(rows=1.5), dict(rows=True), dict(valid_rows=-1), dict(test_rows=-5),
    dict(pos_rate=0.0), dict(pos_rate=1.0), dict(pos_rate=-0.1), dict(card_scale=0.0),
    dict(card_scale=-1.0), dict(card_scale=float("nan")), dict(max_card=1), dict(seed=-1),
])
def test_bad_arguments(tmp_path, kwargs):
    args = dict(rows=10, **SMALL)
    args.update(kwargs)
    with pytest.raises(ConfigError) as exc:
        write_synthetic(tmp_path / "out", **args)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_day_files_written_in_parallel_are_the_single_file_split(tmp_path, monkeypatch):
    """files=3 with 2 worker processes: three files whose concatenation is files=1's train.tsv,
    the same ceiling metrics; more files than chunks is a config error."""
    import ctrkit.data.synth as synth
    from ctrkit.errors import ConfigError
    monkeypatch.setattr(synth, "CHUNK_ROWS", 1000)
    one = synth.write_synthetic(tmp_path / "one", 5500, valid_rows=700, seed=4, progress=False)
    many = synth.write_synthetic(tmp_path / "many", 5500, valid_rows=700, seed=4, progress=False,
                                 files=3, workers=2)
    names = many["files"]["train"]
    assert names == ["train-00000.tsv", "train-00001.tsv", "train-00002.tsv"]
    joined = b"".join((tmp_path / "many" / n).read_bytes() for n in names)
    assert joined == (tmp_path / "one" / "train.tsv").read_bytes()
    assert (tmp_path / "many" / "valid.tsv").read_bytes() == (tmp_path / "one" / "valid.tsv").read_bytes()
    assert many["ceiling_auc"] == one["ceiling_auc"] and many["pos_rate"] == one["pos_rate"]
    with pytest.raises(ConfigError, match="at most 6 file"):
        synth.write_synthetic(tmp_path / "x", 5500, progress=False, files=7)
