"""Raw input formats: which columns a file has, which are label / categorical / numeric.

A `Layout` is everything the reader and the preprocessor need to know about one raw file:
delimiter, header, the source columns to read and their types, and the features to build.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ctrkit.config import DataConfig, FeatureSpec
from ctrkit.errors import DataError

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
    kind: str                 # "categorical" | "numeric"
    source: str
    transform: str = "none"   # numeric: none | log | criteo_bucket (bucketed numerics are categorical)
    fill: Optional[object] = None
    min_count: int = 1
    derive: Optional[str] = None   # avazu_hour | avazu_weekday | avazu_weekend

    @property
    def is_sparse(self) -> bool:
        return self.kind == "categorical" or self.transform == "criteo_bucket"


@dataclass
class Layout:
    format: str
    delimiter: str
    header: bool
    column_names: Optional[List[str]]    # names for headerless files (None: read from header)
    label: str
    features: List[Feature]
    numeric_sources: List[str] = field(default_factory=list)
    string_sources: List[str] = field(default_factory=list)

    @property
    def sparse(self) -> List[Feature]:
        return [f for f in self.features if f.is_sparse]

    @property
    def dense(self) -> List[Feature]:
        return [f for f in self.features if not f.is_sparse]

    @property
    def dict_sources(self) -> List[str]:
        """String columns that feed exactly one plain categorical feature: the CSV parser
        dictionary-encodes them while it parses (in parallel), so only int32 indices are held."""
        uses: Dict[str, List[Feature]] = {}
        for f in self.features:
            uses.setdefault(f.source, []).append(f)
        return [c for c in self.string_sources
                if len(uses.get(c, [])) == 1 and uses[c][0].kind == "categorical"
                and uses[c][0].derive is None and uses[c][0].fill is None]

    @property
    def sources(self) -> List[str]:
        return [self.label] + self.numeric_sources + self.string_sources


def open_text(path: Path):
    """Text handle for plain or gzip files (the slow diagnostic path and header sniffing)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="")
    return open(path, "r", newline="")


def first_line(path: Path) -> str:
    try:
        with open_text(path) as f:
            return f.readline().rstrip("\r\n")
    except (OSError, EOFError) as e:
        raise DataError(path, f"cannot read ({e})") from None


def _looks_like_header(line: str, delimiter: str) -> bool:
    head = line.split(delimiter)[0].strip().strip('"')
    return head.lower() in ("label", "id", "click") or not head.lstrip("-").replace(".", "").isdigit()


def resolve_layout(cfg: DataConfig, path: Path) -> Layout:
    """The layout of one raw file under this data config (header sniffed when `header: auto`)."""
    if cfg.format == "parquet":
        return _generic(cfg, delimiter="", header=True)
    delim = "\t" if cfg.format == "criteo_tsv" else (cfg.delimiter or ",")
    line = first_line(path)
    if not line:
        raise DataError(path, "file is empty")
    header = _looks_like_header(line, delim) if cfg.header == "auto" else bool(cfg.header)
    names = [c.strip().strip('"') for c in line.split(delim)] if header else None
    if cfg.format in ("criteo_tsv", "criteo_csv"):
        return _criteo(cfg, delim, header, names, path)
    if cfg.format == "avazu_csv":
        return _avazu(cfg, delim, header, names, path)
    return _generic(cfg, delim, header)


def _criteo(cfg: DataConfig, delim: str, header: bool, names: Optional[List[str]], path: Path) -> Layout:
    label = "label"
    if names is not None:
        lower = {n.lower(): n for n in names}
        missing = [c for c in CRITEO_COLUMNS if c.lower() not in lower]
        if missing:
            raise DataError(path, f"header lacks Criteo columns {missing[:5]}", line=1)
        label = lower["label"]
        dense = [lower[c.lower()] for c in CRITEO_DENSE]
        cat = [lower[c.lower()] for c in CRITEO_CAT]
    else:
        dense, cat = CRITEO_DENSE, CRITEO_CAT
    feats = [Feature(name=c, kind="numeric", source=s, transform=cfg.dense_transform, fill=0.0,
                     min_count=cfg.min_count) for c, s in zip(CRITEO_DENSE, dense)]
    feats += [Feature(name=c, kind="categorical", source=s, min_count=cfg.min_count)
              for c, s in zip(CRITEO_CAT, cat)]
    return Layout(cfg.format, delim, header, None if header else CRITEO_COLUMNS, label, feats,
                  numeric_sources=list(dense), string_sources=list(cat))


def _avazu(cfg: DataConfig, delim: str, header: bool, names: Optional[List[str]], path: Path) -> Layout:
    cols = AVAZU_COLUMNS
    if names is not None:
        missing = [c for c in AVAZU_COLUMNS if c not in names]
        if missing:
            raise DataError(path, f"header lacks Avazu columns {missing[:5]}", line=1)
    cat_cols = [c for c in cols if c not in ("id", "click", "hour")]
    feats = [Feature(name=n, kind="categorical", source="hour", derive=f"avazu_{n}",
                     min_count=cfg.min_count) for n in AVAZU_HOUR_FEATURES]
    feats += [Feature(name=c, kind="categorical", source=c, min_count=cfg.min_count) for c in cat_cols]
    return Layout("avazu_csv", delim, header, None if header else cols, "click", feats,
                  numeric_sources=[], string_sources=["hour"] + cat_cols)


def _generic(cfg: DataConfig, delimiter: str, header: bool) -> Layout:
    feats: List[Feature] = []
    for spec in cfg.features or []:
        feats.append(_feature_from_spec(spec, cfg))
    numeric = sorted({f.source for f in feats if f.kind == "numeric"})
    strings = sorted({f.source for f in feats if f.kind == "categorical"} - set(numeric))
    names = None if header else [cfg.label] + [f.source for f in feats]
    return Layout(cfg.format, delimiter, header, names, cfg.label, feats,
                  numeric_sources=numeric, string_sources=strings)


def _feature_from_spec(spec: FeatureSpec, cfg: DataConfig) -> Feature:
    transform = "none"
    if spec.type == "numeric":
        transform = spec.transform or cfg.dense_transform
    fill = spec.fill if spec.fill is not None else (0.0 if spec.type == "numeric" else None)
    return Feature(name=spec.name, kind=spec.type, source=spec.source or spec.name, transform=transform,
                   fill=fill, min_count=spec.min_count or cfg.min_count)
