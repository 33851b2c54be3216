"""`prepare`: raw files -> vocabularies + encoded row-major shards + schema.json, streaming.

No split is ever held in memory; files are read in record batches.
- Pass 1 reads the training split and counts each categorical feature's values
  (ctrkit/data/vocab.py: memory is the number of distinct values, not of rows); the counts pick
  the vocabulary: values seen at least `min_count` times get ids 2.. (most frequent first), rarer
  ones share the out-of-vocabulary id 0, missing values id 1.
- Pass 2 reads every split and encodes each batch with those vocabularies, exactly as `predict`
  encodes new rows (ctrkit/data/encode.py), into shards of `shard_rows` rows written as each fills
  (ctrkit/data/shards.py).
Peak memory is the vocabularies, one read block and one shard, whatever the number of rows. A
training file that changes between the passes is an error, not a half-consistent folder.
"""
from __future__ import annotations

import contextlib
import glob
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.feather as feather
from tqdm import tqdm

from ctrkit.config import Config, DataConfig
from ctrkit.data.encode import RowEncoder
from ctrkit.data.fingerprint import first_difference, fingerprint
from ctrkit.data.formats import Layout, resolve_layout
from ctrkit.data.prefetch import prefetch
from ctrkit.data.reader import ReadStats, iter_batches
from ctrkit.data.schema import SCHEMA_FILE, FeatureInfo, Schema, SplitInfo
from ctrkit.data.shards import ShardWriter, bag_rows
from ctrkit.data.tasks import ProcessTasks, TaskRunner
from ctrkit.data.transforms import sparse_column
from ctrkit.data.vocab import ValueCounter, fit_vocab
from ctrkit.errors import ConfigError, CtrkitError, DataError
from ctrkit.ownership import OwnedFolder, check_disjoint, check_folder, is_disk_error, write_error

SPLITS = ("train", "valid", "test")
READ_AHEAD = 2   # record batches read ahead of the one being counted or encoded


def split_files(pattern: str) -> List[Path]:
    """A path or a glob; a missing file is an error naming it."""
    matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
    if not matches:
        raise ConfigError(f"{pattern}: no file matches")
    for m in matches:
        if not Path(m).is_file():
            raise ConfigError(f"{m}: file not found")
    return [Path(m) for m in matches]


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


def prepare(cfg: Config, progress: bool = True, tasks: Optional[TaskRunner] = None) -> Schema:
    """Fit vocabularies on the training split, encode every split, write shards and schema.json.

    A folder already prepared from the same config and input files is reused (`data.overwrite`
    rebuilds it anyway); one ctrkit prepared from other data is rebuilt, replacing only the files
    ctrkit wrote. One process at a time prepares a folder: a second one waits, then reuses it.
    `tasks` runs the per-file work of splits of several files (default: `data.prepare_workers`
    processes; under torchrun, the ranks: ctrkit/distributed/prepare.py)."""
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
        return _build(cfg, files, fp, folder, progress, tasks)


def _build(cfg: Config, files: Dict[str, List[Path]], fp: dict, folder: OwnedFolder,
           progress: bool, tasks: Optional[TaskRunner]) -> Schema:
    """Write everything into a temporary folder of this process inside `folder`, then swap it in:
    the old owned files go, the new ones are renamed into place, schema.json last."""
    dc, out = cfg.data, folder.root
    tmp = out / f".tmp-prepare-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.record(trees=[tmp.name])   # (before it exists: a killed prepare leaves an owned tree)
    tmp.mkdir()
    t0 = time.time()
    try:
        schema = _encode_all(dc, files, tmp, progress, tasks)
        schema.source = fp
        schema.seconds = round(time.time() - t0, 3)
        schema.save(tmp)
        new = OwnedFolder(tmp, PREPARED).files()
        # (every folder it made, the empty vocab/ of hashed features too)
        new_dirs = sorted(str(d.relative_to(tmp)) for d in tmp.rglob("*") if d.is_dir())
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


def _encode_all(dc: DataConfig, files: Dict[str, List[Path]], tmp: Path, progress: bool,
                tasks: Optional[TaskRunner] = None) -> Schema:
    layout = resolve_layout(dc, files["train"][0])
    stamps = {p: _stamp(p) for fs in files.values() for p in fs}
    carve = _held_out(dc, files["train"], progress)   # rows of train kept for valid/test
    with _runner(dc, files, carve, tasks) as pool:
        counted = ReadStats()
        feats = _fit_vocabularies(dc, files["train"], layout, tmp, counted, progress, pool,
                                  limit=carve[0] if carve else None)
        schema = Schema(format=dc.format, label=layout.label, features=feats, splits={}, root=tmp)
        for split, fs in files.items():
            if carve and split == "train":
                parts = _encode_files(dc, fs, split, schema, "", progress, carve)
            elif pool is None or len(fs) == 1:
                parts = _encode_files(dc, fs, split, schema, "", progress)
            else:   # one file per task; each file's shards are its own (part-f<file>-<k>)
                results = pool.map(_encode_files, [(dc, [path], split, schema, f"f{i:05d}-", False)
                                                   for i, path in enumerate(fs)])
                parts = {split: ([], ReadStats(), 0)}
                for result in tqdm(results, desc=f"prepare {split}", unit=" file",
                                   total=len(fs), disable=not progress):
                    (more, part_stats, part_positives), = result.values()
                    shards, stats, positives = parts[split]
                    stats.merge(part_stats)
                    parts[split] = (shards + more, stats, positives + part_positives)
            for path in fs:
                if _stamp(path) != stamps[path]:
                    raise DataError(path, "changed while being prepared; prepare again")
            stats = parts[split][1]
            if split == "train" and counted.files and not carve and \
                    stats.rows_read != counted.rows_read:
                raise DataError(fs[0], f"changed while being prepared ({counted.rows_read} rows "
                                       f"counted, {stats.rows_read} encoded); prepare again")
            for name, (shards, stats, positives) in parts.items():
                d = stats.as_dict()
                schema.splits[name] = SplitInfo(
                    files=d["files"], rows_read=d["rows_read"], rows_written=d["rows_written"],
                    rows_skipped=d["rows_skipped"], skipped=d["skipped"], shards=shards,
                    positives=positives, from_split=None if name == split else split)
            if carve and split == "train":
                held = {k: schema.splits[k].rows_written for k in parts if k != split}
                schema.splits[split].held_out = held
                schema.splits[split].rows_written -= sum(held.values())
    schema.root = None
    return schema


def _held_out(dc: DataConfig, files: List[Path], progress: bool) -> Optional[Tuple[int, ...]]:
    """With data.valid_fraction / test_fraction: (training rows, validation rows, test rows) of
    the training files' rows (after skips), from one counting read; else None."""
    if not (dc.valid_fraction or dc.test_fraction):
        return None
    stats = ReadStats()
    bar = tqdm(desc="prepare rows", unit=" rows", disable=not progress, mininterval=1.0)
    rows = 0
    for _, _, batch in _batches(dc, files, stats):
        rows += batch.num_rows
        bar.update(batch.num_rows)
    bar.close()
    valid, test = round(rows * (dc.valid_fraction or 0)), round(rows * (dc.test_fraction or 0))
    for key, n in (("valid_fraction", valid), ("test_fraction", test)):
        if getattr(dc, key) and n < 1:
            raise DataError(files[0], f"data.{key}={getattr(dc, key)} of {rows} rows holds no row")
    if rows - valid - test < 1:
        raise DataError(files[0], f"{rows} rows leave no training row after the held-out ones")
    return rows - valid - test, valid, test


@contextlib.contextmanager
def _runner(dc: DataConfig, files: Dict[str, List[Path]], carve: Optional[tuple],
            tasks: Optional[TaskRunner]) -> Iterator[Optional[TaskRunner]]:
    """What runs the per-file tasks (None: this process does everything, in one stream): the
    caller's `tasks`, else `data.prepare_workers` processes. A held-out carve needs the rows in
    one stream."""
    workers = min(dc.prepare_workers, max(len(fs) for fs in files.values()))
    if carve or (tasks is None and workers <= 1):
        yield None
    elif tasks is not None:
        yield tasks
    else:
        pool = ProcessTasks(workers)
        try:
            yield pool
        finally:
            pool.close()


def _encode_files(dc: DataConfig, files: List[Path], split: str, schema: Schema, tag: str,
                  progress: bool, carve: Optional[Tuple[int, ...]] = None
                  ) -> Dict[str, Tuple[List[str], ReadStats, int]]:
    """Pass 2 over `files`, in order, into shards `<split>/part-<tag><k>` of schema.root:
    {split: (shard names, row accounting, positives)}. With `carve` (training, validation, test
    rows), the rows after the first go to `valid` and `test` in file order."""
    encoder = RowEncoder(schema)
    multi = tuple(f.name for f in schema.sparse if f.multi)
    ends: List[Tuple[str, Optional[int]]] = [(split, None)]   # (split, its last row + 1)
    if carve:
        n_train, n_valid, _ = carve
        bounds = [(split, n_train), ("valid", n_train + n_valid), ("test", None)]
        ends = [b for b, n in zip(bounds, carve) if n]
        ends[-1] = (ends[-1][0], None)   # (the last takes the rest)
    writers = {s: ShardWriter(Path(schema.root), s, len(schema.sparse), len(schema.dense),
                              dc.shard_rows, multi=multi, tag=tag) for s, _ in ends}
    stats = ReadStats()
    row = 0
    bar = tqdm(desc=f"prepare {split}", unit=" rows", disable=not progress, mininterval=1.0)
    for path, lay, batch in _batches(dc, files, stats):
        encoder.check(lay, str(path))
        sparse, dense, labels, bags = encoder.encode(batch, lay)
        start = 0
        for s, end in ends:   # (the split of each row: by its position in file order)
            stop = len(labels) if end is None else max(start, min(len(labels), end - row))
            if stop > start:
                writers[s].add(sparse[start:stop], dense[start:stop], labels[start:stop],
                               bag_rows(bags, start, stop) if bags else None)
            start = stop
        row += len(labels)
        bar.update(batch.num_rows)
    bar.close()
    out = {}
    for s, w in writers.items():
        shards = w.close()
        part = stats if s == split else ReadStats(files=list(stats.files), rows_read=w.rows)
        part.rows_written = w.rows if s != split else sum(x.rows for x in writers.values())
        out[s] = (shards, part, int(w.positives))
    return out


def _count_files(dc: DataConfig, files: List[Path], names: List[str], stats: ReadStats,
                 progress: bool, limit: Optional[int] = None) -> Dict[str, ValueCounter]:
    """Pass 1 over `files`: each of the features `names`' values counted (of the first `limit`
    rows only, when given: the rest is held out)."""
    counters = {n: ValueCounter() for n in names}
    bar = tqdm(desc="prepare count", unit=" rows", disable=not progress, mininterval=1.0)
    seen = 0
    for _, lay, batch in _batches(dc, files, stats):
        if limit is not None:
            if seen >= limit:   # (the held-out rows after it are not counted: stop reading)
                break
            batch = batch.slice(0, limit - seen)
            seen += batch.num_rows
        for f in lay.sparse:
            if f.name in counters:
                counters[f.name].add(sparse_column(batch, f))
        bar.update(batch.num_rows)
    bar.close()
    return counters


def _counts_of_file(dc: DataConfig, path: Path, names: List[str]) -> Tuple[dict, ReadStats]:
    """A worker's pass 1 over one file: {feature: (values, counts)} and its row accounting."""
    stats = ReadStats()
    counters = _count_files(dc, [path], names, stats, False)
    return {n: c.result() for n, c in counters.items()}, stats


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _batches(dc: DataConfig, files: List[Path], stats: ReadStats):
    """(file, its layout, record batch) for every batch of the files, read a few batches ahead in
    a thread while the caller works on this one."""
    def read():
        for path in files:
            layout = resolve_layout(dc, path)
            for batch in iter_batches(path, layout, dc.read_block_mb, stats, dc.skip_bad_rows,
                                      dc.read_whole_mb):
                yield path, layout, batch
    return prefetch(read(), READ_AHEAD, name="ctrkit-prepare-read")


def _fit_vocabularies(dc: DataConfig, files: List[Path], layout: Layout, tmp: Path,
                      stats: ReadStats, progress: bool,
                      pool: Optional[TaskRunner] = None,
                      limit: Optional[int] = None) -> List[FeatureInfo]:
    """Pass 1: count the training split's values of the `vocab: count` features (a file per
    worker process with a pool, merged in file order: the same vocabularies), write each one's
    vocabulary (vocab/<feature>.arrow: value, count; id i + 2 is row i) and return the features'
    schema entries. Hashed features need no pass: without count features nothing is read."""
    names = [f.name for f in layout.sparse if f.vocab == "count"]
    counters: Dict[str, ValueCounter] = {}
    if names and (pool is None or len(files) == 1):
        counters = _count_files(dc, files, names, stats, progress, limit)
    elif names:
        counters = {n: ValueCounter() for n in names}
        results = pool.map(_counts_of_file, [(dc, path, names) for path in files])
        for counts, part in tqdm(results, desc="prepare count", unit=" file", total=len(files),
                                 disable=not progress):
            stats.merge(part)
            for n, (values, c) in counts.items():
                counters[n].add_counts(values, c)
    vdir = tmp / "vocab"
    vdir.mkdir()
    feats = []
    for f in layout.features:
        if not f.is_sparse:
            feats.append(FeatureInfo(f.name, "dense", f.source, f.transform))
        elif f.vocab == "hash":
            feats.append(FeatureInfo(f.name, "sparse", f.source, f.transform,
                                     vocab_size=f.hash_buckets + 2, min_count=f.min_count,
                                     vocab="hash", hash_buckets=f.hash_buckets, **_multi(f)))
        else:
            vocab, counts = fit_vocab(*counters.pop(f.name).result(), f.min_count, f.max_size)
            feather.write_feather(pa.table({"value": vocab.cast(pa.string()),
                                            "count": pa.array(counts, pa.int64())}),
                                  str(vdir / f"{f.name}.arrow"))
            feats.append(FeatureInfo(f.name, "sparse", f.source, f.transform,
                                     vocab_size=len(vocab) + 2, min_count=f.min_count,
                                     max_size=f.max_size, **_multi(f)))
    return feats


def _multi(f) -> dict:
    """A multi-hot feature's schema keys (none for a one-hot one)."""
    return ({"multi": True, "separator": f.separator, "max_len": f.max_len, "pooling": f.pooling}
            if f.is_multi else {})
