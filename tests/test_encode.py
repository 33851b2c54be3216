"""RowEncoder on the real Criteo and Avazu slices: the ids of every row and feature, read as text
(as `predict` reads) and dictionary-encoded (as `prepare` reads), against a reference written
here from the rules (the training vocabulary as a dict, Criteo's buckets and Avazu's hour
features computed in Python)."""
import csv
import datetime
import math

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from ctrkit import prepare
from ctrkit.config import load_config
from ctrkit.data.encode import RowEncoder
from ctrkit.data.formats import resolve_layout
from ctrkit.data.reader import ReadStats, iter_batches
from tests.conftest import CONFIGS, LAPIS_AVAZU, LAPIS_CRITEO

pytestmark = pytest.mark.shared_data

SLICES = {"criteo": ("criteo_sample.yaml", LAPIS_CRITEO), "avazu": ("avazu_sample.yaml", LAPIS_AVAZU)}


def _bucket(text: str):
    """Criteo's numeric bucket of a field's text (None: missing)."""
    if text == "":
        return None
    x = float(text)
    return int(math.floor(math.log(x) ** 2)) if x > 2 else int(math.floor(x))


def _reference_text(f, value: str):
    """The text a feature's raw field is looked up by (None: missing)."""
    if f.transform == "criteo_bucket":
        b = _bucket(value)
        return None if b is None else str(b)
    if f.derive:
        t = datetime.datetime.strptime(value, "%y%m%d%H")
        return {"avazu_hour": f"{t.hour:02d}", "avazu_weekday": str(t.weekday()),
                "avazu_weekend": "true" if t.weekday() >= 5 else "false"}[f.derive]
    if value == "" and f.fill is not None:
        return str(f.fill)
    return None if value == "" else value


@pytest.mark.parametrize("name", ["criteo", "avazu"])
def test_ids_of_text_and_of_dictionaries_match_the_vocabulary(name, tmp_path):
    config, folder = SLICES[name]
    cfg = load_config(CONFIGS / config, [f"data.prepared_dir={tmp_path / 'prep'}"])
    schema = prepare(cfg, progress=False)
    path = folder / "dev.csv"
    encoder = RowEncoder(schema)
    got = {}
    for dictionaries in (True, False):
        layout = resolve_layout(cfg.data, path, label_optional=True)
        layout.dictionaries = dictionaries
        assert bool(layout.dict_sources) == dictionaries
        parts = [encoder.encode(b, layout)[0]
                 for b in iter_batches(path, layout, 1, ReadStats(), whole_file_mb=0)]
        got[dictionaries] = np.concatenate(parts)
    np.testing.assert_array_equal(got[True], got[False])

    vocab = {f.name: {v: i + 2 for i, v in enumerate(feather.read_table(
        str(schema.vocab_path(f.name))).column("value").to_pylist())} for f in schema.sparse}
    layout = resolve_layout(cfg.data, path, label_optional=True)
    names = layout.column_names
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter=layout.delimiter, quoting=csv.QUOTE_NONE))
    rows = rows[1:] if layout.header else rows
    want = np.empty((len(rows), len(layout.sparse)), np.int32)
    for r, row in enumerate(rows):
        rec = dict(zip(names, row))
        for j, f in enumerate(layout.sparse):
            text = _reference_text(f, rec[f.source])
            want[r, j] = 1 if text is None else vocab[f.name].get(text, 0)
    assert len(rows) == len(got[False])
    np.testing.assert_array_equal(got[False], want)
    assert (want == 0).any() and (want >= 2).any()   # out-of-vocabulary and known values occur
    assert (want == 1).any() == (name == "criteo")    # (Avazu's slice has no missing value)


def test_integer_columns_of_every_width_are_looked_up_by_their_decimal_text(tmp_path):
    """A bucketed numeric arrives as integers: int8..int64 and small unsigned ones by value,
    uint64 by its text (2**64 - 1 is not the -1 it would wrap to in int64); nulls are missing."""
    cfg = load_config(CONFIGS / "criteo_sample.yaml", [f"data.prepared_dir={tmp_path / 'prep'}"])
    schema = prepare(cfg, progress=False)
    f = next(f for f in schema.sparse if f.transform == "criteo_bucket" and
             "-1" in feather.read_table(str(schema.vocab_path(f.name))).column("value").to_pylist())
    vocab = feather.read_table(str(schema.vocab_path(f.name))).column("value").to_pylist()
    ident = {v: i + 2 for i, v in enumerate(vocab)}
    encoder = RowEncoder(schema)
    values = [-1, 0, 1, None, 127]
    want = [ident["-1"], ident["0"], ident["1"], 1, ident.get("127", 0)]
    for t in (pa.int8(), pa.int32(), pa.int64()):
        np.testing.assert_array_equal(encoder._ids(pa.array(values, t), f), want)
    wide = pa.array([-2 ** 63, 2 ** 63 - 1, 0], pa.int64())   # (no wrap-around into the table)
    np.testing.assert_array_equal(encoder._ids(wide, f), [0, 0, ident["0"]])
    for t in (pa.uint8(), pa.uint32()):
        np.testing.assert_array_equal(encoder._ids(pa.array(values[1:3] + [None], t), f),
                                      want[1:4])
    big = pa.array([2 ** 64 - 1, 0, None], pa.uint64())
    np.testing.assert_array_equal(encoder._ids(big, f), [0, ident["0"], 1])
