"""Raw input formats: which columns a file has, which are label / categorical / numeric.

A `Layout` is everything the reader and the preprocessor need to know about one raw file:
delimiter, header, the source columns to read and their types, and the features to build.
"""
from __future__ import annotations

import bz2
import codecs
import csv
import dataclasses
import gzip
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from ctrkit.config import DataConfig, FeatureSpec
from ctrkit.errors import ConfigError, DataError
from ctrkit.registry import FORMATS

CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label"] + CRITEO_DENSE + CRITEO_CAT
AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain",
                 "site_category", "app_id", "app_domain", "app_category", "device_id",
                 "device_ip", "device_model", "device_type", "device_conn_type",
                 "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
AVAZU_HOUR_FEATURES = ["hour", "weekday", "weekend"]   # derived from the YYMMDDHH `hour` column


@dataclass
class Feature:
    """A model input built from one source column."""

    name: str
    kind: str                 # "categorical" | "numeric" | "multi_categorical"
    source: str
    transform: str = "none"   # numeric: none | log | criteo_bucket (bucketed numerics are categorical)
    fill: Optional[object] = None
    min_count: int = 1
    derive: Optional[str] = None   # avazu_hour | avazu_weekday | avazu_weekend
    vocab: str = "count"           # categorical ids: count (a fitted vocabulary) | hash
    max_size: Optional[int] = None
    hash_buckets: int = 0
    separator: Optional[str] = None   # multi_categorical: values joined by it, a bag per row
    max_len: Optional[int] = None
    pooling: str = "sum"

    @property
    def is_sparse(self) -> bool:
        return self.kind in ("categorical", "multi_categorical") or self.transform == "criteo_bucket"

    @property
    def is_multi(self) -> bool:
        return self.kind == "multi_categorical"


@dataclass
class Layout:
    format: str
    delimiter: str
    header: bool
    column_names: Optional[List[str]]    # the file's columns (None: the parser reads the header)
    label: Optional[str]                 # None: the file has no label column (scoring new rows)
    features: List[Feature]
    numeric_sources: List[str] = field(default_factory=list)
    string_sources: List[str] = field(default_factory=list)
    quoting: bool = True      # False: `"` is an ordinary character (Criteo/Avazu never quote)
    passthrough: List[str] = field(default_factory=list)   # other columns read as they are
    dictionaries: bool = True   # False: no column is dictionary-encoded while parsed (predict)

    @property
    def sparse(self) -> List[Feature]:
        return [f for f in self.features if f.is_sparse]

    @property
    def dense(self) -> List[Feature]:
        return [f for f in self.features if not f.is_sparse]

    @property
    def dict_sources(self) -> List[str]:
        """String columns that feed exactly one plain categorical feature: the CSV parser
        dictionary-encodes them while it parses (in parallel), so only int32 indices are held
        (`prepare` counts values by them). With `dictionaries` off, none: `predict` looks text
        up row by row, and parsing 26 columns into dictionaries took 1.5x the plain text's time."""
        if not self.dictionaries:
            return []
        uses: Dict[str, List[Feature]] = {}
        for f in self.features:
            uses.setdefault(f.source, []).append(f)
        return [c for c in self.string_sources
                if len(uses.get(c, [])) == 1 and uses[c][0].kind == "categorical"
                and uses[c][0].derive is None and uses[c][0].fill is None]

    @property
    def hour_sources(self) -> List[str]:
        """Columns that must hold YYMMDDHH date-hours (the sources of derived features)."""
        return sorted({f.source for f in self.features if f.derive})

    @property
    def float32_sources(self) -> List[str]:
        """Numeric columns used as they are (no log, no buckets): their values must fit float32."""
        return sorted({f.source for f in self.dense if f.transform == "none"})

    @property
    def sources(self) -> List[str]:
        used = ([self.label] if self.label else []) + self.numeric_sources + self.string_sources
        return used + [c for c in self.passthrough if c not in used]

    def without_label(self) -> "Layout":
        """The same file layout for a file that lacks the label column (predict's input)."""
        names = [c for c in self.column_names if c != self.label] if self.column_names else None
        return dataclasses.replace(self, column_names=names, label=None)


# Leading bytes of compressed files: gzip and bz2 are read (whatever the file's name), the others
# are refused with a message instead of being parsed as text.
_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"PK\x03\x04", "zip"),
          (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")]


def compression(path: Path) -> Optional[str]:
    """"gzip", "bz2" or None (plain text), from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, kind in _MAGIC:
        if head.startswith(magic) and (kind != "bz2" or head[3:4].isdigit()):
            if kind not in ("gzip", "bz2"):
                raise DataError(path, f"{kind} compressed data is not supported; decompress it "
                                      "(plain, gzip and bz2 files are read)")
            return kind
    return None


@contextmanager
def open_text(path: Path) -> Iterator[Iterator[str]]:
    """The decoded lines of a plain, gzip or bz2 file (the slow diagnostic path and header
    sniffing). A UTF-8 byte order mark is dropped; bytes that are not UTF-8 raise a DataError
    naming the line."""
    kind = compression(path)
    opener = {"gzip": gzip.open, "bz2": bz2.open}.get(kind, open)
    with opener(path, "rb") as f:
        yield _decoded(path, f)


def _decoded(path: Path, f) -> Iterator[str]:
    for n, raw in enumerate(f, 1):
        if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(path, "not valid UTF-8 text", line=n) from None


def first_line(path: Path) -> str:
    try:
        with open_text(path) as lines:
            return next(lines, "").rstrip("\r\n")
    except EOFError:
        kind = compression(path)
        raise DataError(path, f"truncated {kind} stream (ends before line 1)") from None
    except OSError as e:
        raise DataError(path, f"cannot read ({e})") from None


def delimiter_hint(line: str, delimiter: str) -> str:
    """" (is the delimiter ','? the line contains ';')" for a line without the delimiter."""
    if delimiter in line:
        return ""
    for d in (",", ";", "\t", "|"):
        if d in line:
            return f" (is the delimiter {delimiter!r}? the line contains {d!r})"
    return ""


def _looks_like_header(line: str, delimiter: str) -> bool:
    head = line.split(delimiter)[0].strip().strip('"')
    return head.lower() in ("label", "id", "click") or not head.lstrip("-").replace(".", "").isdigit()


def resolve_layout(cfg: DataConfig, path: Path, label_optional: bool = False) -> Layout:
    """The layout of one raw file under this data config (header sniffed when `header: auto`).
    `label_optional`: a file without the label column is read too (its layout's label is None):
    by its header, or without one by having exactly one column fewer."""
    fmt = get_format(cfg.format)
    if fmt.columnar:
        layout = fmt.layout(cfg, "", True, None, path, "")
        if label_optional and layout.label not in parquet_columns(path):
            return layout.without_label()
        return layout
    delim = fmt.delimiter or cfg.delimiter or ","
    line = first_line(path)
    if not line:
        raise DataError(path, "file is empty")
    header = _looks_like_header(line, delim) if cfg.header == "auto" else bool(cfg.header)
    fields = next(csv.reader([line], delimiter=delim))
    names = [c.strip().strip('"') for c in fields] if header else None
    hint = delimiter_hint(line, delim)
    if not header:
        full = _headerless(cfg, delim, path, hint)
        if label_optional and len(fields) == len(full.column_names) - 1:
            return full.without_label()
        return full
    return _with_header(cfg, delim, names, path, hint, label_optional)


def table_layout(cfg: DataConfig, names: List[str], name: str) -> Layout:
    """The layout of an in-memory table with these columns (the label column optional); `name`
    stands for the file in messages."""
    try:
        return _with_header(cfg, "", names, Path(name), "", label_optional=True)
    except DataError as e:   # (no "line 1" for a table: its column names are not a line)
        raise DataError(name, str(e).split(": ", 1)[1]) from None


def _with_header(cfg: DataConfig, delim: str, names: List[str], path: Path, hint: str,
                 label_optional: bool = False) -> Layout:
    without = label_optional and not _has_label(cfg, names)
    if without:
        names = names + [_label_name(cfg)]
    layout = get_format(cfg.format).layout(cfg, delim, True, names, path, hint)
    return layout.without_label() if without else layout


def _label_name(cfg: DataConfig) -> str:
    return get_format(cfg.format).label or cfg.label


def _has_label(cfg: DataConfig, names: List[str]) -> bool:
    return header_name(cfg.format, names, _label_name(cfg)) is not None


def header_name(format_name: str, names: List[str], wanted: str) -> Optional[str]:
    """The column of `names` that is `wanted`, matched as the format matches its header (Criteo's
    in any case); None: not there."""
    if wanted in names:
        return wanted
    if get_format(format_name).header_any_case:
        return {n.lower(): n for n in names}.get(wanted.lower())
    return None


def parquet_columns(path: Path) -> List[str]:
    import pyarrow.parquet as pq
    try:
        return pq.read_schema(str(path)).names
    except Exception as e:   # (an unreadable file: the reader names the problem)
        raise DataError(path, f"not a readable parquet file ({e})".splitlines()[0]) from None


def _headerless(cfg: DataConfig, delim: str, path: Path, hint: str) -> Layout:
    return get_format(cfg.format).layout(cfg, delim, False, None, path, hint)


def _criteo(cfg: DataConfig, delim: str, header: bool, names: Optional[List[str]], path: Path,
            hint: str) -> Layout:
    label = "label"
    if names is not None:
        lower = {n.lower(): n for n in names}
        missing = [c for c in CRITEO_COLUMNS if c.lower() not in lower]
        if missing:
            raise DataError(path, f"header lacks Criteo columns {missing[:5]}{hint}", line=1)
        label = lower["label"]
        dense = [lower[c.lower()] for c in CRITEO_DENSE]
        cat = [lower[c.lower()] for c in CRITEO_CAT]
    else:
        dense, cat = CRITEO_DENSE, CRITEO_CAT
    feats = [Feature(name=c, kind="numeric", source=s, transform=cfg.dense_transform, fill=0.0,
                     **vocab_rule(cfg)) for c, s in zip(CRITEO_DENSE, dense)]
    feats += [Feature(name=c, kind="categorical", source=s, **vocab_rule(cfg))
              for c, s in zip(CRITEO_CAT, cat)]
    # Criteo values are integers and hex hashes: a `"` is a stray character, never a quote
    return Layout(cfg.format, delim, header, names or CRITEO_COLUMNS, label, feats,
                  numeric_sources=list(dense), string_sources=list(cat), quoting=False)


def _avazu(cfg: DataConfig, delim: str, header: bool, names: Optional[List[str]], path: Path,
           hint: str) -> Layout:
    cols = AVAZU_COLUMNS
    if names is not None:
        missing = [c for c in AVAZU_COLUMNS if c not in names]
        if missing:
            raise DataError(path, f"header lacks Avazu columns {missing[:5]}{hint}", line=1)
    cat_cols = [c for c in cols if c not in ("id", "click", "hour")]
    feats = [Feature(name=n, kind="categorical", source="hour", derive=f"avazu_{n}",
                     **vocab_rule(cfg)) for n in AVAZU_HOUR_FEATURES]
    feats += [Feature(name=c, kind="categorical", source=c, **vocab_rule(cfg)) for c in cat_cols]
    return Layout("avazu_csv", delim, header, names or cols, "click", feats,
                  numeric_sources=[], string_sources=["hour"] + cat_cols, quoting=False)


def _generic_file(cfg: DataConfig, delim: str, header: bool, names: Optional[List[str]],
                  path: Path, hint: str) -> Layout:
    """csv / parquet: the columns `data.features` names."""
    layout = _generic(cfg, delim, header, names)
    missing = [c for c in layout.sources if names is not None and c not in names]
    if missing:
        raise DataError(path, f"header lacks columns {missing[:5]}{hint}", line=1)
    return layout


def _generic(cfg: DataConfig, delimiter: str, header: bool,
             names: Optional[List[str]] = None) -> Layout:
    feats: List[Feature] = []
    for spec in cfg.features or []:
        feats.append(_feature_from_spec(spec, cfg))
    numeric = sorted({f.source for f in feats if f.kind == "numeric"})
    strings = sorted({f.source for f in feats if f.kind != "numeric"} - set(numeric))
    if not header:
        names = [cfg.label] + [f.source for f in feats]
    return Layout(cfg.format, delimiter, header, names, cfg.label, feats,
                  numeric_sources=numeric, string_sources=strings)


def _feature_from_spec(spec: FeatureSpec, cfg: DataConfig) -> Feature:
    transform = "none"
    if spec.type == "numeric":
        transform = spec.transform or cfg.dense_transform
    fill = spec.fill if spec.fill is not None else (0.0 if spec.type == "numeric" else None)
    multi = {"separator": spec.separator, "max_len": spec.max_len,
             "pooling": spec.pooling or "sum"} if spec.type == "multi_categorical" else {}
    return Feature(name=spec.name, kind=spec.type, source=spec.source or spec.name, transform=transform,
                   fill=fill, **vocab_rule(cfg, spec), **multi)


def vocab_rule(cfg: DataConfig, spec: Optional[FeatureSpec] = None) -> dict:
    """A feature's vocabulary keys: its own (`data.features`), else the data section's."""
    own = (lambda k: getattr(spec, k)) if spec is not None else (lambda k: None)
    vocab = own("vocab") or cfg.vocab
    return {"min_count": own("min_count") or cfg.min_count, "vocab": vocab,
            "max_size": (own("max_size") or cfg.max_size) if vocab == "count" else None,
            "hash_buckets": (own("hash_buckets") or cfg.hash_buckets or 0) if vocab == "hash" else 0}


# ------------------------------------------------------------------ the formats by name
LayoutFn = Callable[[DataConfig, str, bool, Optional[List[str]], Path, str], Layout]


@dataclass(frozen=True)
class Format:
    """A raw format that `data.format` names: `layout(cfg, delimiter, header, names, path, hint)`
    makes one file's Layout (`names`: its header's columns, None without a header; `hint`: text
    to add to a message about a wrong delimiter). Registered in ctrkit.registry.FORMATS."""
    layout: LayoutFn
    delimiter: Optional[str] = None   # None: data.delimiter, else ","
    label: Optional[str] = None       # None: data.label
    columnar: bool = False            # Parquet: typed columns by name, no text parsing
    needs_features: bool = False      # data.features lists the columns to use
    header_any_case: bool = False     # header names match in any case


def get_format(name: str) -> Format:
    try:
        return FORMATS.get(name)
    except KeyError as e:
        raise ConfigError(f"data.format: {e.args[0]}") from None


CRITEO_TSV = Format(_criteo, delimiter="\t", label="label", header_any_case=True)
CRITEO_CSV = Format(_criteo, label="label", header_any_case=True)
AVAZU_CSV = Format(_avazu, label="click")
GENERIC_CSV = Format(_generic_file, needs_features=True)
PARQUET = Format(_generic_file, columnar=True, needs_features=True)
