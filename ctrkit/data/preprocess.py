"""`prepare`: raw files -> vocabularies + encoded columnar shards + schema.json.

Each split is read once with pyarrow. Categorical columns are dictionary-encoded per record batch
(one C++ hash pass over the rows), batch dictionaries are merged into one set of distinct values per
split, and the training split's counts pick the vocabulary: values seen at least `min_count` times
get ids 2.. (most frequent first), rarer ones share the out-of-vocabulary id 0, missing values id 1.
Valid/test values are looked up in the training vocabulary once per distinct value, not per row.
"""
from __future__ import annotations

import glob
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
from tqdm import tqdm

from ctrkit.config import Config, DataConfig
from ctrkit.data.formats import Feature, Layout, resolve_layout
from ctrkit.data.reader import ReadStats, iter_batches
from ctrkit.data.schema import MISSING_ID, OOV_ID, FeatureInfo, Schema, SplitInfo
from ctrkit.data.shards import write_shards
from ctrkit.errors import ConfigError, CtrkitError

SPLITS = ("train", "valid", "test")


def split_files(pattern: str) -> List[Path]:
    """A path or a glob; a missing file is an error naming it."""
    matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
    if not matches:
        raise ConfigError(f"{pattern}: no file matches")
    for m in matches:
        if not Path(m).is_file():
            raise ConfigError(f"{m}: file not found")
    return [Path(m) for m in matches]


# ---------------------------------------------------------------- feature columns

def _derived(col: pa.Array, kind: str) -> pa.Array:
    """Avazu's `hour` (YYMMDDHH) -> hour of day, weekday, weekend flag."""
    if kind == "avazu_hour":
        return pc.utf8_slice_codeunits(col, 6, 8)
    ts = pc.strptime(col, format="%y%m%d%H", unit="s", error_is_null=True)
    dow = pc.day_of_week(ts)
    if kind == "avazu_weekday":
        return dow
    return pc.greater_equal(dow, 5)


def _criteo_bucket(col: pa.Array) -> pa.Array:
    """floor(ln(x)^2) for x > 2, x itself otherwise (the Criteo winners' numeric bucketing)."""
    x = col.to_numpy(zero_copy_only=False)
    mask = np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(x > 2, np.floor(np.log(np.where(x > 2, x, 1.0)) ** 2), np.floor(x))
    b = np.where(mask, 0, b).astype(np.int64)
    return pa.array(b, mask=mask)


def _sparse_column(batch: pa.RecordBatch, f: Feature) -> pa.Array:
    col = batch.column(f.source)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if f.derive:
        return _derived(col, f.derive)
    if f.transform == "criteo_bucket":
        return _criteo_bucket(col)
    if f.fill is not None:
        col = pc.fill_null(col, pa.scalar(str(f.fill)))
    return col


def _dense_column(batch: pa.RecordBatch, f: Feature) -> np.ndarray:
    x = batch.column(f.source).to_numpy(zero_copy_only=False).astype(np.float64)
    x = np.where(np.isnan(x), float(f.fill or 0.0), x)
    if f.transform == "log":
        x = np.sign(x) * np.log1p(np.abs(x))
    return x.astype(np.float32)


@dataclass
class _Encoded:
    """One split held as per-batch local ids + batch dictionaries, until vocabularies are known."""

    local: Dict[str, List[np.ndarray]] = field(default_factory=dict)   # int32, -1 = missing
    dicts: Dict[str, List[pa.Array]] = field(default_factory=dict)
    dense: List[np.ndarray] = field(default_factory=list)              # [n, Dn] per batch
    labels: List[np.ndarray] = field(default_factory=list)
    rows: int = 0


def _read_split(files: List[Path], cfg: DataConfig, stats: ReadStats, progress: bool,
                desc: str) -> tuple:
    enc = _Encoded()
    layout: Optional[Layout] = None
    bar = tqdm(desc=f"prepare {desc}", unit=" rows", disable=not progress, mininterval=1.0)
    for path in files:
        layout = resolve_layout(cfg, path)
        for batch in iter_batches(path, layout, cfg.read_block_mb, stats, cfg.skip_bad_rows,
                                  cfg.read_whole_mb):
            for f in layout.sparse:
                d = pc.dictionary_encode(_sparse_column(batch, f))
                idx = d.indices.to_numpy(zero_copy_only=False)
                if d.indices.null_count:
                    idx = np.where(d.indices.is_null().to_numpy(zero_copy_only=False), -1, idx)
                enc.local.setdefault(f.name, []).append(idx.astype(np.int32))
                enc.dicts.setdefault(f.name, []).append(d.dictionary)
            if layout.dense:
                enc.dense.append(np.stack([_dense_column(batch, f) for f in layout.dense], axis=1))
            enc.labels.append(batch.column(layout.label).to_numpy(zero_copy_only=False)
                              .astype(np.float32))
            enc.rows += batch.num_rows
            bar.update(batch.num_rows)
    bar.close()
    return enc, layout


def _merge_dicts(dicts: List[pa.Array]) -> tuple:
    """Distinct values of a split and, per batch, the map local id -> split-wide id."""
    types = {d.type for d in dicts}
    if len(types) > 1:
        dicts = [d.cast(pa.string()) for d in dicts]
    allv = pa.concat_arrays(dicts)
    denc = pc.dictionary_encode(allv)
    gmap = denc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    bounds = np.cumsum([0] + [len(d) for d in dicts])
    return denc.dictionary, [gmap[bounds[i]:bounds[i + 1]] for i in range(len(dicts))]


def _global_ids(local: List[np.ndarray], maps: List[np.ndarray]) -> List[np.ndarray]:
    return [np.where(l >= 0, m[np.maximum(l, 0)] if len(m) else 0, -1) for l, m in zip(local, maps)]


def _fit_vocab(values: pa.Array, gids: List[np.ndarray], min_count: int) -> tuple:
    counts = np.bincount(np.concatenate([g[g >= 0] for g in gids]), minlength=len(values)) \
        if len(values) else np.zeros(0, np.int64)
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] >= min_count]
    remap = np.full(len(values), OOV_ID, dtype=np.int32)
    remap[order] = np.arange(len(order), dtype=np.int32) + 2
    vocab = values.take(pa.array(order))
    return vocab, counts[order], remap


def _lookup(values: pa.Array, vocab: pa.Array) -> np.ndarray:
    if len(values) == 0:
        return np.zeros(0, np.int32)
    if values.type != vocab.type:
        values, vocab = values.cast(pa.string()), vocab.cast(pa.string())
    idx = pc.index_in(values, value_set=vocab)
    out = idx.to_numpy(zero_copy_only=False)
    found = ~idx.is_null().to_numpy(zero_copy_only=False)
    return np.where(found, np.nan_to_num(out, nan=0).astype(np.int64) + 2, OOV_ID).astype(np.int32)


def _final_ids(gids: List[np.ndarray], remap: np.ndarray) -> np.ndarray:
    ids = np.concatenate(gids) if gids else np.zeros(0, np.int64)
    return np.where(ids >= 0, remap[np.maximum(ids, 0)] if len(remap) else OOV_ID,
                    MISSING_ID).astype(np.int32)


def _check_output(out: Path, inputs: List[Path], overwrite: bool) -> None:
    out_r = out.resolve()
    for p in inputs:
        pr = p.resolve()
        if pr == out_r or out_r in pr.parents:
            raise CtrkitError(f"{out}: prepared_dir contains input file {p}; choose another folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CtrkitError(f"{out} is not empty; set data.overwrite=true to replace it")
        if not (out / "schema.json").exists():
            raise CtrkitError(f"{out} is not empty and is not a ctrkit prepared folder; "
                              "refusing to delete it")


def prepare(cfg: Config, progress: bool = True) -> Schema:
    """Fit vocabularies on the training split, encode every split, write shards and schema.json."""
    dc = cfg.data
    if not dc.train:
        raise ConfigError("data.train is required")
    files = {s: split_files(getattr(dc, s)) for s in SPLITS if getattr(dc, s)}
    out = Path(dc.prepared_dir)
    _check_output(out, [p for fs in files.values() for p in fs], dc.overwrite)
    t0 = time.time()
    tmp = out.with_name(out.name + ".tmp-prepare")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    vocabs: Dict[str, tuple] = {}
    infos: Dict[str, SplitInfo] = {}
    layout = None
    try:
        for split, fs in files.items():
            stats = ReadStats()
            enc, lay = _read_split(fs, dc, stats, progress, split)
            layout = layout or lay
            sparse_cols = []
            for f in layout.sparse:
                values, maps = _merge_dicts(enc.dicts[f.name])
                gids = _global_ids(enc.local[f.name], maps)
                if split == "train":
                    vocab, counts, remap = _fit_vocab(values, gids, f.min_count)
                    vocabs[f.name] = (vocab, counts)
                else:
                    remap = _lookup(values, vocabs[f.name][0])
                sparse_cols.append(_final_ids(gids, remap))
                enc.local[f.name] = enc.dicts[f.name] = []   # free memory early
            sparse = (np.stack(sparse_cols, axis=1) if sparse_cols
                      else np.zeros((enc.rows, 0), np.int32))
            dense = np.concatenate(enc.dense) if enc.dense else np.zeros((enc.rows, 0), np.float32)
            labels = np.concatenate(enc.labels) if enc.labels else np.zeros(0, np.float32)
            shards = write_shards(tmp, split, sparse, dense, labels, dc.shard_rows)
            stats.rows_written = int(labels.shape[0])
            d = stats.as_dict()
            infos[split] = SplitInfo(files=d["files"], rows_read=d["rows_read"],
                                     rows_written=d["rows_written"], rows_skipped=d["rows_skipped"],
                                     skipped=d["skipped"], shards=shards,
                                     positives=int(labels.sum()))
        vdir = tmp / "vocab"
        vdir.mkdir()
        feats = []
        for f in layout.features:
            if f.is_sparse:
                vocab, counts = vocabs[f.name]
                feather.write_feather(pa.table({"value": vocab.cast(pa.string()),
                                                "count": pa.array(counts, pa.int64())}),
                                      str(vdir / f"{f.name}.arrow"))
                feats.append(FeatureInfo(f.name, "sparse", f.source, f.transform,
                                         vocab_size=len(vocab) + 2, min_count=f.min_count))
            else:
                feats.append(FeatureInfo(f.name, "dense", f.source, f.transform))
        schema = Schema(format=dc.format, label=layout.label, features=feats, splits=infos,
                        seconds=round(time.time() - t0, 3))
        schema.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    schema.root = out
    return schema
