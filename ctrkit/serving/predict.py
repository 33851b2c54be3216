"""Scoring new rows with a trained run: `Predictor.load(run).predict(rows)` and `ctrkit predict`.

A run folder holds what scoring needs (ctrkit/train/run_dir.py): its config.yaml, its checkpoints,
and in `data/` the schema and vocabularies it was trained with. Rows go through the run's own
transforms and vocabularies (ctrkit/data/encode.py: a value never seen gets the
out-of-vocabulary id, as in training), are checked as `prepare` checks them (a bad value is an
error naming file, line and field, or with `skip_bad_rows` a counted skip), and are scored in
batches. Files are streamed: memory does not grow with the input (but for the labels and
probabilities kept for AUC when the input has labels, 12 bytes a row).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from ctrkit.config import Config, load_config
from ctrkit.data.encode import RowEncoder
from ctrkit.data.formats import (Layout, header_name, parquet_columns, resolve_layout,
                                  table_layout)
from ctrkit.data.loader import make_batch
from ctrkit.data.shards import Bags, bag_rows
from ctrkit.data.prefetch import prefetch
from ctrkit.data.preprocess import split_files
from ctrkit.data.reader import ReadStats, iter_batches, iter_table_batches
from ctrkit.data.schema import Schema
from ctrkit.errors import CtrkitError, NoDataRows
from ctrkit.ownership import atomic_path
from ctrkit.serving.bf16 import bf16_copy
from ctrkit.metrics import auc_logloss
from ctrkit.train.checkpointing import checkpoint_to_evaluate, load_for_evaluation
from ctrkit.train.run_dir import SCORING_DATA
from ctrkit.train.setup import build_training_model

PROBABILITY = "probability"   # the output column
PREFETCH = 2                  # batches read and encoded ahead of the one being scored
SCORE_ROWS = 4096             # rows per model call
READ_BLOCK_MB = 4             # read blocks of ~16k rows: scoring starts after the first one, and
                              # reading, encoding and scoring overlap (16 MB blocks: 1.5x slower)
OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
Rows = Union["pa.Table", "pa.RecordBatch", list, "object"]   # a pandas DataFrame is the object


def find_run(path: Path) -> Tuple[Path, Optional[Path]]:
    """(run folder, checkpoint or None) of a run folder or a checkpoint inside one."""
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").is_file():
        return path, None
    if path.exists():
        for parent in list(path.resolve().parents)[:3]:
            if (parent / "config.yaml").is_file() and (parent / SCORING_DATA).is_dir():
                return parent, path
        raise CtrkitError(f"{path}: neither a run folder nor a checkpoint inside one")
    raise CtrkitError(f"{path}: not found")


@dataclass
class PredictSummary:
    rows_read: int
    rows_written: int
    rows_skipped: int
    skipped: dict
    seconds: float
    output: Optional[str] = None
    metrics: Optional[dict] = None   # AUC and logloss, when the input has labels

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["rows_per_s"] = round(self.rows_read / self.seconds, 1) if self.seconds > 0 else None
        return d


PRECISIONS = ("fp32", "bf16")


class Predictor:
    """A trained model with the encoders it was trained with. `predict(rows)` takes a pandas
    DataFrame, a pyarrow Table or a list of dicts (raw values, label column optional) and returns
    one probability per row (numpy float64), in row order; `predict_files` streams files.

    `precision`: "fp32" scores exactly as training evaluates; "bf16" runs the MLP in bfloat16
    with batch norm folded in (ctrkit/serving/bf16.py: the tables, sums and the sigmoid stay
    float32), several times faster where the CPU has bf16 units (AVX-512 BF16, AMX) at a small
    cost in agreement (bench/RESULTS.md "Serving" measures it)."""

    def __init__(self, cfg: Config, schema: Schema, model: torch.nn.Module, checkpoint: Path,
                 batch_rows: int = 65536, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise CtrkitError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.cfg, self.schema, self.checkpoint = cfg, schema, checkpoint
        self.model = bf16_copy(model) if precision == "bf16" else model.eval()
        self.precision = precision
        self.encoder = RowEncoder(schema)
        self.batch_rows = batch_rows
        self.keys = [f.name for f in schema.sparse]
        self._ones: dict = {}

    @classmethod
    def load(cls, run: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None,
             batch_rows: int = 65536, precision: str = "fp32") -> "Predictor":
        """The model of a run folder (its best checkpoint, else last), or of a checkpoint in one."""
        run_dir, named = find_run(Path(run))
        named = Path(checkpoint) if checkpoint is not None else named
        try:
            cfg = load_config(str(run_dir / "config.yaml"))
        except CtrkitError as e:
            raise CtrkitError(f"{run_dir}: config.yaml does not load with this ctrkit version "
                              f"({e})") from None
        if not (run_dir / SCORING_DATA / "schema.json").is_file():
            raise CtrkitError(f"{run_dir}: no {SCORING_DATA}/schema.json (a run trained by an "
                              "older ctrkit, or one that never started): train it again to score "
                              "with it")
        schema = Schema.load(run_dir / SCORING_DATA)
        path = checkpoint_to_evaluate(run_dir, str(named) if named else None)
        model = build_training_model(cfg, schema, torch.device("cpu"))
        load_for_evaluation(model, path, cfg.model.name)
        return cls(cfg, schema, model, path, batch_rows, precision)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _score(self, sparse: np.ndarray, dense: np.ndarray, multi: Bags) -> np.ndarray:
        """Probabilities of encoded rows, in model batches of SCORE_ROWS (a 400-wide MLP runs
        1.5x faster on 4096 rows at a time than on 65536 here: they stay in the cache)."""
        out = []
        for s in range(0, len(sparse), SCORE_ROWS):
            sp, de = sparse[s:s + SCORE_ROWS], dense[s:s + SCORE_ROWS]
            batch = make_batch(self.keys, sp, de, np.zeros(len(sp), np.float32), self._ones,
                               multi=bag_rows(multi, s, s + len(sp)) if multi else None)
            out.append(torch.sigmoid(batch.logits(self.model)).double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def _encoded(self, batches: Iterator[pa.RecordBatch], layout: Layout):
        for rb in batches:
            for start in range(0, rb.num_rows, self.batch_rows):
                part = rb.slice(start, self.batch_rows)
                yield (part,) + self.encoder.encode(part, layout)

    def _scored(self, batches: Iterator[pa.RecordBatch], layout: Layout):
        """(record batch, probabilities, labels or None) per batch of rows; the next batches
        are read and encoded in a thread while this one is scored."""
        for part, sparse, dense, labels, multi in prefetch(self._encoded(batches, layout), PREFETCH,
                                                    name="ctrkit-predict-encode"):
            yield part, self._score(sparse, dense, multi), labels

    def predict(self, rows: Rows, skip_bad_rows: bool = False) -> np.ndarray:
        """One probability per row of a DataFrame, pyarrow Table or list of dicts."""
        table = _as_table(rows)
        if table.num_rows == 0:
            return np.zeros(0)
        layout = table_layout(self.cfg.data, table.column_names, "rows")
        self.encoder.check(layout, "rows")
        batches = iter_table_batches(table, "rows", layout, ReadStats(), skip_bad_rows)
        out = [p for _, p, _ in self._scored(batches, layout)]
        return np.concatenate(out) if out else np.zeros(0)

    def _file_layout(self, path: Path, columns: Sequence[str] = ()) -> Layout:
        """How `predict_files` reads `path`: its columns, the `columns` passed through, categorical
        text read as text (no dictionaries: every row is looked up), checked against the run."""
        layout = resolve_layout(self.cfg.data, path, label_optional=True)
        layout.passthrough = _passthrough(layout, columns, path)
        layout.dictionaries = False
        self.encoder.check(layout, str(path))
        return layout

    def predict_files(self, inputs: Sequence[str], output: Union[str, Path],
                      columns: Sequence[str] = (), skip_bad_rows: Optional[bool] = None,
                      progress: bool = True) -> PredictSummary:
        """Score raw files (the formats `prepare` reads) into `output` (.parquet, .csv or .tsv):
        the `columns` passed through, then `probability`, one row per row read (less the counted
        skips). The output appears whole, atomically, and never replaces an existing file."""
        output = Path(output)
        kind = OUTPUT_FORMATS.get(output.suffix.lower())
        if kind is None:
            raise CtrkitError(f"--output {output}: name a .parquet, .csv or .tsv file")
        if output.exists():
            raise CtrkitError(f"--output {output} exists; ctrkit never replaces a file it did not "
                              "write: choose another name")
        if not output.parent.is_dir():
            raise CtrkitError(f"--output {output}: folder {output.parent} does not exist")
        files = [p for pattern in inputs for p in split_files(pattern)]
        skip = self.cfg.data.skip_bad_rows if skip_bad_rows is None else skip_bad_rows
        stats, labels_all, probs_all = ReadStats(), [], []
        writer = None
        t0 = time.time()
        bar = tqdm(desc="predict", unit=" rows", disable=not progress, mininterval=1.0)
        with atomic_path(output) as tmp, _scoring_threads(self.precision == "bf16"):
            try:
                for path in files:
                    if path.stat().st_size == 0:
                        print(f"ctrkit predict: {path} is empty: no rows to score", flush=True)
                        continue
                    layout = self._file_layout(path, columns)
                    sources = layout.passthrough
                    batches = iter_batches(path, layout, READ_BLOCK_MB, stats, skip,
                                           whole_file_mb=0)
                    for rb, probs, labels in self._scored(_nonempty(batches), layout):
                        table = pa.table([rb.column(c) for c in sources] + [pa.array(probs)],
                                         names=list(columns) + [PROBABILITY])
                        writer = writer or _writer(tmp, kind, table.schema)
                        writer.write_table(table)
                        if labels is not None:
                            labels_all.append(labels)
                            probs_all.append(probs)
                        bar.update(rb.num_rows)
                if writer is None:   # no rows at all: an empty file with the columns
                    empty = [(c, pa.string()) for c in columns] + [(PROBABILITY, pa.float64())]
                    writer = _writer(tmp, kind, pa.schema(empty))
            finally:
                bar.close()
                if writer is not None:
                    writer.close()
        d = stats.as_dict()
        metrics = None
        if labels_all and sum(len(x) for x in labels_all):
            metrics = auc_logloss(np.concatenate(labels_all), np.concatenate(probs_all))
        written = d["rows_read"] - d["rows_skipped"]
        return PredictSummary(d["rows_read"], written, d["rows_skipped"], d["skipped"],
                              round(time.time() - t0, 3), str(output), metrics)


@contextmanager
def _scoring_threads(give_reader_a_core: bool):
    """While `predict_files` runs in bf16, torch has one thread less (at least one): bf16 scoring
    is fast enough that the file's reading and encoding thread is the slower stage, and that
    needs a core of its own. fp32 scoring is the slower stage and keeps every thread. At 2
    threads here (bench/RESULTS.md "Serving"): bf16 1.3-1.6x faster with 1 scoring thread, fp32
    1.4x slower. (torch's thread count is per process: a thread that first uses torch inside the
    window keeps the lower count, so `predict`, which a server may call from many threads, leaves
    it alone.)"""
    n = torch.get_num_threads()
    fewer = max(1, n - 1) if give_reader_a_core else n
    if fewer == n:
        yield
        return
    torch.set_num_threads(fewer)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _nonempty(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The reader's batches; a file with no data rows (a header alone) scores to nothing."""
    try:
        yield from batches
    except NoDataRows as e:
        print(f"ctrkit predict: {e.path} has no data rows: no rows to score", flush=True)


def _passthrough(layout: Layout, columns: Sequence[str], path: Path) -> List[str]:
    """The file's names of the columns to pass through (matched as the format matches its
    header: Criteo's in any case); a name that is not a column of the file is one line."""
    names = layout.column_names or parquet_columns(path)
    out = []
    for c in columns:
        actual = header_name(layout.format, names, c)
        if actual is None:
            raise CtrkitError(f"--columns {c}: not a column of {path} (its columns: "
                              f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
        out.append(actual)
    return out


def _writer(path: Path, kind: str, schema: pa.Schema):
    if kind == "parquet":
        return pq.ParquetWriter(str(path), schema)
    options = pacsv.WriteOptions(delimiter="\t" if kind == "tsv" else ",")
    return pacsv.CSVWriter(str(path), schema, write_options=options)


def _as_table(rows: Rows) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    if isinstance(rows, list):   # (through pandas: a NaN among strings means missing, as there)
        import pandas as pd
        return pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    if hasattr(rows, "columns") and hasattr(rows, "dtypes"):   # a pandas DataFrame
        return pa.Table.from_pandas(rows, preserve_index=False)
    raise CtrkitError(f"predict: rows must be a pandas DataFrame, a pyarrow Table or a list of "
                      f"dicts, not {type(rows).__name__}")
