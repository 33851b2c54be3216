"""`preprocess.json`: how a server in any language turns raw rows into an exported model's inputs.

The spec is built from the prepared folder's `schema.json` (the features in model order, their
vocabulary sizes) and from the data config it records (`schema.source`, ctrkit/data/
fingerprint.py), read back through ctrkit/data/formats.py, so the sources, fill values and
transforms are the ones `prepare` used. The encodings it names are those of
ctrkit/data/transforms.py (`dense_column`, `sparse_column`, `criteo_bucket`, `derived`);
docs/serving.md describes every field.
"""
from __future__ import annotations

from typing import List, Optional

from ctrkit.config import DataConfig
from ctrkit.data.formats import AVAZU_COLUMNS, CRITEO_COLUMNS, Feature, Layout, table_layout
from ctrkit.data.reader import HOUR_FORMAT, NULLS
from ctrkit.data.schema import MISSING_ID, OOV_ID, Schema
from ctrkit.errors import CtrkitError

SPEC_FORMAT = "ctrkit-preprocess"
SPEC_VERSION = 1

HEADER_RULE = ("header 'auto': the first line is a header when its first field (quotes and blanks "
               "stripped) is label, id or click in any case, or is not a number")
TRANSFORMS = {
    "none": "x as float32",
    "log": "sign(x) * log1p(|x|), computed in float32 on the float32 value (a value finite in "
           "float64 but beyond float32: sign(x) * log1p(|x|) computed in float64)",
}
ENCODINGS = {
    "value": "the raw text of the column (a column read as float64: Arrow's float64-to-text "
             "cast); a missing value becomes `fill` first when `fill` is not null",
    "criteo_bucket": "the column as a float64 number x: floor(ln(x)^2) if x > 2 else floor(x), "
                     "as an int64 written in decimal (e.g. '-1', '0', '23')",
    "avazu_hour": f"characters 7-8 of the {HOUR_FORMAT} date-hour text: the hour of day, '00'-'23'",
    "avazu_weekday": f"the day of the week of the {HOUR_FORMAT} date-hour, Monday '0' .. Sunday "
                     "'6' (a text that is no date-hour: missing)",
    "avazu_weekend": f"'true' when the {HOUR_FORMAT} date-hour falls on a Saturday or Sunday, "
                     "else 'false'",
}


def data_config(schema: Schema) -> DataConfig:
    """The data config `prepare` made the schema's folder with (as schema.json records it)."""
    data = (schema.source or {}).get("data")
    if not isinstance(data, dict):
        raise CtrkitError(f"{schema.root}: schema.json does not record the data config it was "
                          "prepared with (an older ctrkit); prepare the data again to export")
    return DataConfig.model_validate(data)


def file_columns(dc: DataConfig) -> List[str]:
    """The columns of a raw file without a header, in file order."""
    if dc.format in ("criteo_tsv", "criteo_csv"):
        return list(CRITEO_COLUMNS)
    if dc.format == "avazu_csv":
        return list(AVAZU_COLUMNS)
    sources = [s.source or s.name for s in dc.features or []]
    return [dc.label] + list(dict.fromkeys(sources))


def _layout(schema: Schema, dc: DataConfig) -> Layout:
    layout = table_layout(dc, file_columns(dc), "the exported model's input")
    have = [(f.name, "sparse" if f.is_sparse else "dense") for f in layout.features]
    if have != [(f.name, f.kind) for f in schema.features]:
        raise CtrkitError(f"{schema.root}: schema.json's features do not match the data config "
                          "it records; prepare the data again to export")
    return layout


def _encoding(f: Feature) -> str:
    if f.derive:
        return f.derive
    return "criteo_bucket" if f.transform == "criteo_bucket" else "value"


def _fill(f: Feature) -> Optional[object]:
    return None if f.derive or f.transform == "criteo_bucket" else f.fill


def preprocess_spec(schema: Schema, program: dict) -> dict:
    """The spec of a model exported from `schema`; `program` names the exported files."""
    dc = data_config(schema)
    layout = _layout(schema, dc)
    by_name = {f.name: f for f in layout.features}
    dense = [by_name[f.name] for f in schema.dense]
    numeric = set(layout.numeric_sources)
    return {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "program": {**program,
                    "inputs": [{"name": "dense", "dtype": "float32", "shape": ["batch", len(dense)],
                                "columns": [f.name for f in dense]}] + _id_inputs(schema),
                    "output": {"name": "probability", "dtype": "float32", "shape": ["batch"],
                               "meaning": "click probability: sigmoid of the model's logit"}},
        "raw": {"format": dc.format, "delimiter": None if dc.format == "parquet" else
                ("\t" if dc.format == "criteo_tsv" else (dc.delimiter or ",")),
                "header": dc.header, "header_rule": HEADER_RULE, "columns": file_columns(dc),
                "label": layout.label, "quoting": layout.quoting,
                "numeric_columns": sorted(numeric),
                "missing_values": sorted(NULLS),
                "note": "without a header the columns are `columns` in order; with one, columns "
                        "are found by name (Criteo's in any case). A numeric column is read as "
                        "float64; a field in `missing_values` is missing (also for text)."},
        "dense_rule": "a missing or NaN value -> `fill`, then `transform`",
        "dense": [{"name": f.name, "source": f.source, "fill": float(f.fill or 0.0),
                   "transform": f.transform} for f in dense],
        "sparse": [{"name": s.name, "source": by_name[s.name].source,
                    "encoding": _encoding(by_name[s.name]), "fill": _fill(by_name[s.name]),
                    "read_as": "float64" if by_name[s.name].source in numeric else "string",
                    "vocab_size": s.vocab_size, **_ids_of(s), **_bags_of(s)}
                   for s in schema.sparse],
        "ids": {"oov": OOV_ID, "missing": MISSING_ID, "first_vocabulary_id": 2,
                "rule": "a missing value (after `fill`) -> `missing`; a feature with a "
                        "`vocabulary` file: a value in it -> 2 + its row number there (column "
                        "`value`, text), any other value -> `oov`; a feature with `hash`: "
                        "2 + fnv1a64(the value's text) mod `hash.buckets`",
                "fnv1a64": "FNV-1a, 64 bit, over the UTF-8 bytes: h = 0xcbf29ce484222325; for "
                           "each byte b: h = (h XOR b) * 0x100000001b3 mod 2^64"},
        "transforms": TRANSFORMS,
        "encodings": ENCODINGS,
    }


MULTI_RULE = ("the field's text (after `fill`) is split at `separator`, empty parts dropped, the "
              "first `max_len` kept (null: all); each part gets its id by the rule above; a "
              "missing field, or one with no part left, is the bag [missing]; the model pools a "
              "bag by `pooling` (sum or mean)")


def jagged(schema: Schema) -> bool:
    """Whether a model of `schema` takes the jagged inputs (values, lengths): it has multi-hot
    features."""
    return any(f.multi for f in schema.sparse)


def _id_inputs(schema: Schema) -> List[dict]:
    """One `ids` matrix; with multi-hot features a KeyedJaggedTensor's values and lengths."""
    names = [f.name for f in schema.sparse]
    if not jagged(schema):
        return [{"name": "ids", "dtype": "int64", "shape": ["batch", len(names)], "columns": names}]
    return [{"name": "values", "dtype": "int64", "shape": ["n"], "keys": names,
             "layout": "key-major: every row's ids of keys[0] (row 0's bag, row 1's, ...), then "
                       "keys[1]'s, ...; a one-hot feature's bag is its one id"},
            {"name": "lengths", "dtype": "int32", "shape": [f"{len(names)} * batch"],
             "layout": "key-major like values: lengths[k * batch + i] is the size of row i's bag "
                       "of keys[k] (1 for a one-hot feature); they sum to n"}]


def _bags_of(s) -> dict:
    """A multi-hot feature's splitting and pooling (nothing for a one-hot one)."""
    if not s.multi:
        return {}
    return {"multi": {"separator": s.separator, "max_len": s.max_len, "pooling": s.pooling,
                      "rule": MULTI_RULE}}


def _ids_of(s) -> dict:
    """How a sparse feature's values become ids: its vocabulary file, or its hash."""
    if s.vocab == "hash":
        return {"vocabulary": None, "hash": {"function": "fnv1a64", "buckets": s.hash_buckets}}
    return {"vocabulary": f"vocab/{s.name}.arrow"}
