"""`prepare`: raw files -> vocabularies + encoded columnar shards + schema.json.

Each split is read once with pyarrow. Categorical columns are dictionary-encoded per record batch
(one C++ hash pass over the rows), batch dictionaries are merged into one set of distinct values per
split, and the training split's counts pick the vocabulary: values seen at least `min_count` times
get ids 2.. (most frequent first), rarer ones share the out-of-vocabulary id 0, missing values id 1.
Valid/test values are looked up in the training vocabulary once per distinct value, not per row.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
from tqdm import tqdm

from ctrkit.config import Config, DataConfig
from ctrkit.data.formats import Layout, resolve_layout
from ctrkit.data.reader import ReadStats, iter_batches
from ctrkit.data.fingerprint import first_difference, fingerprint
from ctrkit.data.schema import MISSING_ID, OOV_ID, SCHEMA_FILE, FeatureInfo, Schema, SplitInfo
from ctrkit.data.shards import write_shards
from ctrkit.data.transforms import dense_column, sparse_column
from ctrkit.errors import ConfigError, CtrkitError
from ctrkit.ownership import OwnedFolder, check_disjoint, check_folder, is_disk_error, write_error

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


@dataclass
class _Encoded:
    """One split held as per-batch dictionary arrays, until vocabularies are known."""

    chunks: Dict[str, List[pa.DictionaryArray]] = field(default_factory=dict)
    dense: Dict[str, List[pa.Array]] = field(default_factory=dict)     # raw numeric columns
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
                col = sparse_column(batch, f)   # plain categoricals arrive encoded by the parser
                d = col if pa.types.is_dictionary(col.type) else pc.dictionary_encode(col)
                enc.chunks.setdefault(f.name, []).append(d)
            for f in layout.dense:
                enc.dense.setdefault(f.name, []).append(batch.column(f.source))
            enc.labels.append(batch.column(layout.label).to_numpy(zero_copy_only=False)
                              .astype(np.float32))
            enc.rows += batch.num_rows
            bar.update(batch.num_rows)
    bar.close()
    return enc, layout


def _split_ids(chunks: List[pa.DictionaryArray]) -> tuple:
    """Distinct values of a split and each row's index into them (-1 = missing).

    `unify_dictionaries` merges the per-batch dictionaries and remaps the indices in C++."""
    if not chunks:
        return pa.array([], pa.string()), np.zeros(0, np.int64)
    if len({c.type for c in chunks}) > 1:   # e.g. parquet files typed differently
        chunks = [c.cast(pa.dictionary(pa.int32(), pa.string())) for c in chunks]
    col = pa.chunked_array(chunks, type=chunks[0].type).unify_dictionaries()
    values = col.chunk(0).dictionary
    idx = pa.chunked_array([c.indices for c in col.chunks], type=col.type.index_type).combine_chunks()
    return values, pc.fill_null(idx, -1).to_numpy(zero_copy_only=False)


def _fit_vocab(values: pa.Array, gids: np.ndarray, min_count: int) -> tuple:
    counts = np.bincount(gids + 1, minlength=len(values) + 1)[1:]   # slot 0 counts missing
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


def _encode_feature(chunks: List[pa.DictionaryArray], vocab: Optional[tuple],
                    min_count: int) -> tuple:
    """One feature's final ids as a contiguous int32 column, and (training split only, `vocab`
    None) the fitted vocabulary."""
    values, gids = _split_ids(chunks)
    fitted = None
    if vocab is None:
        vocab_values, counts, remap = _fit_vocab(values, gids, min_count)
        fitted = (vocab_values, counts)
    else:
        remap = _lookup(values, vocab[0])
    # One gather: missing (-1) picks the appended last slot.
    return np.take(np.append(remap, np.int32(MISSING_ID)).astype(np.int32), gids), fitted


PREPARED = "prepared folder"


def _up_to_date(out: Path, fp: dict) -> tuple:
    """(the prepared schema, None) when `out` was prepared from exactly this data config and these
    input files; else (None, why not)."""
    if not (out / SCHEMA_FILE).is_file():
        return None, None
    try:
        schema = Schema.load(out)
    except CtrkitError as e:
        return None, str(e)
    why = first_difference(schema.source, fp) or schema.damaged()
    return (schema, None) if why is None else (None, why)


def _schema_stamp(out: Path) -> Optional[tuple]:
    try:
        st = (out / SCHEMA_FILE).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def open_prepared(cfg: Config, progress: bool = True) -> Iterator[Schema]:
    """The prepared data of `cfg` (prepared first when missing, or again when its fingerprint
    differs), with the folder's shared lock held in the block: a `prepare` that would replace it
    waits until the block ends. `data.overwrite` is ignored here (training uses up-to-date data)."""
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"overwrite": False})})
    out = Path(cfg.data.prepared_dir)
    check_folder(out, "data.prepared_dir")
    folder = OwnedFolder(out, PREPARED)
    for _ in range(3):   # (another process may replace it between our prepare and our lock)
        if folder.owned:
            files = {s: split_files(getattr(cfg.data, s)) for s in SPLITS if getattr(cfg.data, s)}
            with folder.lock(exclusive=False, wait=True):
                schema, _ = _up_to_date(out, fingerprint(cfg.data, files))
                if schema is not None:
                    yield schema
                    return
        prepare(cfg, progress)
    raise CtrkitError(f"{out}: keeps changing while this process tries to use it")


def prepare(cfg: Config, progress: bool = True) -> Schema:
    """Fit vocabularies on the training split, encode every split, write shards and schema.json.

    A folder already prepared from the same config and input files is reused (`data.overwrite`
    rebuilds it anyway); one ctrkit prepared from other data is rebuilt, replacing only the files
    ctrkit wrote. One process at a time prepares a folder: a second one waits, then reuses it."""
    dc = cfg.data
    if not dc.train:
        raise ConfigError("data.train is required")
    files = {s: split_files(getattr(dc, s)) for s in SPLITS if getattr(dc, s)}
    out = Path(dc.prepared_dir)
    check_folder(out, "data.prepared_dir")
    check_disjoint(out, "data.prepared_dir", [p for fs in files.values() for p in fs])
    folder = OwnedFolder(out, PREPARED)
    fp = fingerprint(dc, files)
    if not folder.owned:   # never put even a lock file into a folder that is not ctrkit's
        schema, why = _up_to_date(out, fp)
        if why:
            raise CtrkitError(f"data.prepared_dir: {out} was prepared from other data ({why}) "
                              "and has no ctrkit manifest, so it is not replaced: prepare into "
                              "another folder")
        folder.check_replaceable("prepare")
    seen = _schema_stamp(out)
    waiting = f"{out} is being prepared or used by another ctrkit process; waiting for it"
    if not dc.overwrite:
        with folder.lock(exclusive=False, wait=True, waiting_message=waiting):
            schema, why = _up_to_date(out, fp)
        if schema is not None:
            return schema
    with folder.lock(exclusive=True, wait=True, waiting_message=waiting):
        schema, why = _up_to_date(out, fp)
        if schema is not None and (not dc.overwrite or _schema_stamp(out) != seen):
            return schema   # (up to date, or just written by the process we waited for)
        folder.check_replaceable("data.overwrite=true" if dc.overwrite else "prepare")
        if why:
            print(f"ctrkit: preparing {out} again: {why}", file=sys.stderr, flush=True)
        return _build(cfg, files, fp, folder, progress)


def _build(cfg: Config, files: Dict[str, List[Path]], fp: dict, folder: OwnedFolder,
           progress: bool) -> Schema:
    """Write everything into a temporary folder of this process inside `folder`, then swap it in:
    the old owned files go, the new ones are renamed into place, schema.json last."""
    dc, out = cfg.data, folder.root
    tmp = out / f".tmp-prepare-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.record(trees=[tmp.name])   # (before it exists: a killed prepare leaves an owned tree)
    tmp.mkdir()
    t0 = time.time()
    try:
        schema = _encode_all(dc, files, tmp, progress)
        schema.source = fp
        schema.seconds = round(time.time() - t0, 3)
        schema.save(tmp)
        new = OwnedFolder(tmp, PREPARED).files()
        new_dirs = sorted({str(a) for f in new for a in Path(f).parents if str(a) != "."})
        folder.record(files=new, dirs=new_dirs)   # before they appear: a crash leaves owned files
        folder.clear(keep=tmp.name)   # (the old output, and trees of killed prepares)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == SCHEMA_FILE):
            os.replace(entry, out / entry.name)   # schema.json last: it makes the folder valid
        tmp.rmdir()
        folder.reset(files=new, dirs=new_dirs)
    except OSError as e:
        folder.remove_tree(tmp.name)
        if is_disk_error(e):
            raise write_error(Path(e.filename or out), e) from None
        raise
    except BaseException:
        folder.remove_tree(tmp.name)   # (this process's own temporary folder)
        raise
    schema.root = out
    return schema


def _encode_all(dc: DataConfig, files: Dict[str, List[Path]], tmp: Path, progress: bool) -> Schema:
    vocabs: Dict[str, tuple] = {}
    infos: Dict[str, SplitInfo] = {}
    layout = None
    for split, fs in files.items():
        stats = ReadStats()
        enc, lay = _read_split(fs, dc, stats, progress, split)
        layout = layout or lay
        # Features are independent and numpy/pyarrow release the GIL: one thread per core.
        sparse, dense = [], []
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            jobs = {f.name: pool.submit(_encode_feature, enc.chunks.pop(f.name, []),
                                        vocabs.get(f.name) if split != "train" else None,
                                        f.min_count)
                    for f in layout.sparse}
            dense_jobs = [pool.submit(dense_column, enc.dense.pop(f.name, []), f, enc.rows)
                          for f in layout.dense]
            for name, job in jobs.items():
                ids, fitted = job.result()
                sparse.append(ids)
                if fitted is not None:
                    vocabs[name] = fitted
            dense = [job.result() for job in dense_jobs]
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
    return Schema(format=dc.format, label=layout.label, features=feats, splits=infos)
