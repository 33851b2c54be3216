"""Streaming raw-file reader on pyarrow's multithreaded CSV parser, with exact error locations.

The fast path never looks at single rows in Python. When pyarrow rejects a file (wrong column
count, a non-numeric value in a numeric column, a truncated gzip stream) or a batch holds a value
that parses but cannot be used (an infinite number, an impossible date-hour), a slow diagnostic
pass re-reads the file line by line to name the exact line and field in a one-line `DataError`.
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ctrkit.data.formats import Layout, compression, delimiter_hint, get_format, open_text
from ctrkit.errors import DataError, NoDataRows

HOUR_FORMAT = "%y%m%d%H"
NULLS = frozenset(pacsv.ConvertOptions().null_values)   # values the parser reads as missing


@dataclass
class ReadStats:
    """Row accounting for one split: every input row is read, then written or skipped for a reason."""

    files: List[str] = field(default_factory=list)
    rows_read: int = 0
    rows_written: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def merge(self, other: "ReadStats") -> None:
        """Add another part's accounting (a file read by another process), after this one's."""
        self.files += other.files
        self.rows_read += other.rows_read
        self.rows_written += other.rows_written
        for reason, n in other.skipped.items():
            self.skip(reason, n)

    def as_dict(self) -> dict:
        return dict(files=self.files, rows_read=self.rows_read, rows_written=self.rows_written,
                    rows_skipped=sum(self.skipped.values()), skipped=dict(self.skipped))


def _csv_options(layout: Layout, block_mb: int, skip_bad: bool, invalid: List[int]):
    read = pacsv.ReadOptions(block_size=block_mb << 20, use_threads=True,
                             column_names=layout.column_names,
                             skip_rows=1 if (layout.header and layout.column_names) else 0)

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append(row.number)   # (list.append is atomic: parser threads may call this)
        return "skip"

    parse = pacsv.ParseOptions(delimiter=layout.delimiter,
                               quote_char='"' if layout.quoting else False,
                               invalid_row_handler=on_invalid if skip_bad else None)
    types = {c: pa.string() for c in layout.passthrough}
    if layout.label:
        types[layout.label] = pa.int64()
    types.update({c: pa.float64() for c in layout.numeric_sources})
    types.update({c: pa.string() for c in layout.string_sources})
    types.update({c: pa.dictionary(pa.int32(), pa.string()) for c in layout.dict_sources})
    if skip_bad:  # numerics are validated per value below, so read them as text
        types.update({c: pa.string() for c in layout.numeric_sources})
        if layout.label:
            types[layout.label] = pa.string()
    convert = pacsv.ConvertOptions(column_types=types, include_columns=layout.sources,
                                   strings_can_be_null=True, quoted_strings_can_be_null=True)
    return read, parse, convert


_NUMBER = r"^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|(?i:nan|inf|infinity))$"

Check = Tuple[str, str, pa.Array]   # (skip reason, column, True where the row is fine; no nulls)


def _bad_hours(col: pa.Array) -> pa.Array:
    """The distinct non-null values that are not a real YYMMDDHH date-hour (the parser alone
    accepts '1410210' and rolls '14023000' over to March 2)."""
    values = pc.drop_null(pc.unique(col))
    ts = pc.strptime(values, format=HOUR_FORMAT, unit="s", error_is_null=True)
    ok = pc.fill_null(pc.equal(pc.strftime(ts, format=HOUR_FORMAT), values), False)
    return values.filter(pc.invert(ok))


def _value_checks(cols: Dict[str, pa.Array], layout: Layout) -> List[Check]:
    """Values that parse but cannot be used: infinite numbers, impossible date-hours."""
    checks = [("non_finite", c, pc.invert(pc.fill_null(pc.is_inf(cols[c]), False)))
              for c in layout.numeric_sources]
    checks += [("too_large", c, pc.fill_null(pc.less_equal(pc.abs(cols[c]), FLOAT32_MAX), True))
               for c in layout.float32_sources]
    for c in layout.hour_sources:
        checks.append(("bad_hour", c, pc.invert(pc.is_in(cols[c], value_set=_bad_hours(cols[c])))))
    return checks


def _keep(checks: List[Check], stats: ReadStats) -> pa.Array:
    """Rows passing every check; each other row is counted once, under its first failed check
    (None: no checks, every row)."""
    keep = None
    for reason, _, ok in checks:
        bad = pc.invert(ok) if keep is None else pc.and_(keep, pc.invert(ok))
        stats.skip(reason, pc.sum(bad).as_py() or 0)
        keep = ok if keep is None else pc.and_(keep, ok)
    return keep


def _checked_text(text: pa.Array, pattern: str, missing_ok: bool) -> Tuple[pa.Array, pa.Array]:
    """(ok per row, the text with bad values as null) for numbers that arrive as text: a value
    must match `pattern`; a missing one is ok when `missing_ok`."""
    ok = pc.fill_null(pc.match_substring_regex(text, pattern), missing_ok)
    return ok, pc.if_else(ok, text, pa.scalar(None, text.type))


def _filter_bad_values(batch: pa.RecordBatch, layout: Layout, stats: ReadStats) -> pa.RecordBatch:
    """skip_bad_rows mode: drop (and count) rows with a label not in {0,1}, a non-numeric or
    infinite number, or a bad date-hour. Label and numerics arrive as text."""
    cols = {name: batch.column(name) for name in batch.schema.names}
    null = pa.scalar(None, pa.string())
    checks = []
    if layout.label:
        ok = pc.is_in(cols[layout.label], value_set=pa.array(["0", "1"]))
        checks.append(("bad_label", layout.label, ok))
        cols[layout.label] = pc.cast(pc.if_else(ok, cols[layout.label], null), pa.int64())
    for c in layout.numeric_sources:
        ok, text = _checked_text(pc.utf8_trim_whitespace(cols[c]), _NUMBER, True)
        checks.append(("non_numeric", c, ok))
        cols[c] = pc.cast(text, pa.float64())
    checks += _value_checks(cols, layout)
    keep = _keep(checks, stats)
    batch = pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols))
    return batch if keep is None else batch.filter(keep)


def iter_batches(path: Path, layout: Layout, block_mb: int, stats: ReadStats,
                 skip_bad: bool = False, whole_file_mb: int = 1024) -> Iterator[pa.RecordBatch]:
    """Record batches of the needed columns, every value checked; each input row is counted in
    `stats.rows_read` and is either yielded or counted as skipped."""
    if not path.exists():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    stats.files.append(str(path))
    before = dict(stats.skipped)
    if get_format(layout.format).columnar:
        batches = _iter_parquet(path, layout, stats, skip_bad)
    else:
        batches = _iter_csv(path, layout, block_mb, stats, skip_bad, whole_file_mb)
    n_rows = 0
    for batch in batches:
        if batch.num_rows:
            n_rows += batch.num_rows
            yield batch
    if n_rows == 0:
        skipped = {k: n - before.get(k, 0) for k, n in stats.skipped.items()}
        if any(skipped.values()):
            why = ", ".join(f"{k} {n}" for k, n in skipped.items() if n)
            raise DataError(path, f"every row was skipped ({why})")
        raise NoDataRows(path)


def _iter_csv(path: Path, layout: Layout, block_mb: int, stats: ReadStats, skip_bad: bool,
              whole_file_mb: int) -> Iterator[pa.RecordBatch]:
    whole = path.stat().st_size <= whole_file_mb << 20
    invalid: List[int] = []   # rows with a wrong column count (skip mode)
    read, parse, convert = _csv_options(layout, block_mb, skip_bad, invalid)
    try:
        stream = pa.input_stream(str(path), compression=compression(path))
        if whole:
            # Small enough to hold: read_csv parses all blocks in parallel (~2.5x the streaming
            # reader's speed here); larger files stream block by block in bounded memory.
            table = pacsv.read_csv(stream, read_options=read, parse_options=parse,
                                   convert_options=convert)
            reader = table.to_batches(max_chunksize=1 << 20)
        elif not layout.quoting:
            # No quoted fields, so no line break inside a value: pieces of a few blocks cut at a
            # line end, each parsed in parallel; memory is one piece, whatever the file's size.
            reader = _pieces(stream, read, parse, convert, read.block_size * max(2, os.cpu_count() or 1))
        else:
            # (the streaming reader with threads reads ahead of its consumer without a bound:
            # one thread keeps memory to a block)
            read.use_threads = False
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse,
                                    convert_options=convert)
        for batch in reader:
            if batch.num_rows == 0:
                continue
            stats.rows_read += batch.num_rows
            if skip_bad:
                batch = _filter_bad_values(batch, layout, stats)
            else:
                _check_values(batch, layout)
            yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, EOFError, KeyError) as e:
        raise diagnose(path, layout, str(e)) from None
    stats.rows_read += len(invalid)
    stats.skip("wrong_column_count", len(invalid))


FIRST_PIECE = 1 << 20   # ~4k Criteo rows: predict scored nothing for the ~0.1 s an 8 MB first
                        # piece took to read and encode (1 in 7 of a 100k-row file's time), nor
                        # while the next 8 MB were read


def _pieces(stream, read: pacsv.ReadOptions, parse: pacsv.ParseOptions,
            convert: pacsv.ConvertOptions, size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of a CSV without quoting, read in pieces of `size` bytes, each ending at a
    line end and parsed by `read_csv` (its blocks in parallel). The first piece is FIRST_PIECE
    and each next one twice the last up to `size`, so a consumer starts early and then never waits
    for a whole large piece; a piece is the bytes left over from the last one plus new ones, at
    most its size (no 1-row block beyond the last whole block)."""
    rest, first, want = b"", True, min(size, FIRST_PIECE)
    while True:
        data = stream.read(max(want - len(rest), 1 << 16))
        want = min(size, 2 * want)
        buf = rest + data
        if not data:
            if not buf:
                return
            cut = len(buf)
        else:
            cut = buf.rfind(b"\n") + 1
            if cut == 0:   # (a line longer than a piece: read on)
                rest = buf
                continue
        piece, rest = buf[:cut], buf[cut:]
        table = pacsv.read_csv(pa.py_buffer(piece), read_options=read, parse_options=parse,
                               convert_options=convert)
        if first:   # later pieces have no header line, and the names the first one had
            first = False
            read = pacsv.ReadOptions(block_size=read.block_size, use_threads=read.use_threads,
                                     column_names=table.column_names, skip_rows=0)
        yield from table.to_batches(max_chunksize=1 << 20)
        if not data:
            return


def _check_values(batch: pa.RecordBatch, layout: Layout) -> None:
    """Strict mode: any bad value fails the read; `diagnose` then finds its line."""
    lab = batch.column(layout.label) if layout.label else None
    bad = [layout.label] if lab is not None and (lab.null_count or not pc.all(
        pc.is_in(lab, value_set=pa.array([0, 1], pa.int64()))).as_py()) else []
    bad += [c for c in layout.numeric_sources if pc.any(pc.is_inf(batch.column(c))).as_py()]
    bad += [c for c in layout.hour_sources if len(_bad_hours(batch.column(c)))]
    bad += [c for c in layout.float32_sources
            if pc.any(pc.greater(pc.abs(batch.column(c)), FLOAT32_MAX)).as_py()]
    if bad:
        raise pa.ArrowInvalid(f"bad value in column {bad[0]}")


_MESSAGES = {"bad_label": "label must be 0 or 1, got {!r}", "non_numeric": "not a number: {!r}",
             "non_finite": "not a finite number: {!r}",
             "bad_hour": "not a YYMMDDHH date-hour: {!r}",
             "too_large": "{!r} does not fit in float32 (use dense_transform: log)"}
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _iter_parquet(path: Path, layout: Layout, stats: ReadStats,
                  skip_bad: bool) -> Iterator[pa.RecordBatch]:
    try:
        f = pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(path, f"not a readable parquet file ({e})") from None
    missing = [c for c in layout.sources if c not in f.schema_arrow.names]
    if missing:
        raise DataError(path, f"columns {missing} not in file (has {f.schema_arrow.names[:8]}...)")
    batches = f.iter_batches(batch_size=262_144, columns=layout.sources)

    def read() -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(path, f"not a readable parquet file ({e})".splitlines()[0]) from None
            if batch is None:
                return
            yield batch
    return typed_batches(read(), path, layout, stats, skip_bad)


def iter_table_batches(table: pa.Table, name: str, layout: Layout, stats: ReadStats,
                       skip_bad: bool = False,
                       batch_rows: int = 262_144) -> Iterator[pa.RecordBatch]:
    """An in-memory table's rows (a DataFrame or dicts made into one), typed and checked as a
    parquet file's are; `name` stands for the file in messages."""
    missing = [c for c in layout.sources if c not in table.column_names]
    if missing:
        raise DataError(Path(name), f"columns {missing} missing (has {table.column_names[:8]}...)")
    stats.files.append(name)
    return typed_batches(iter(table.select(layout.sources).to_batches(max_chunksize=batch_rows)),
                         Path(name), layout, stats, skip_bad)


def typed_batches(batches: Iterator[pa.RecordBatch], path: Path, layout: Layout, stats: ReadStats,
                  skip_bad: bool) -> Iterator[pa.RecordBatch]:
    """Columns cast to the reader's types (label int64, numerics float64, strings with "" as
    missing), every value checked: a bad one fails with its row and field, or (`skip_bad`) its
    row is counted as skipped."""
    row0 = 0
    for batch in batches:
        cols, texts, checks = {}, {}, []
        for name in batch.schema.names:
            col = batch.column(name)
            numeric = name == layout.label or name in layout.numeric_sources
            if numeric and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                # numbers as text (a DataFrame of strings): checked as the CSV reader checks them
                text = pc.utf8_trim_whitespace(col)
                texts[name] = text = pc.if_else(pc.equal(text, ""), pa.scalar(None, col.type), text)
                label = name == layout.label
                ok, col = _checked_text(text, "^[01]$" if label else _NUMBER, not label)
                checks.append(("bad_label" if label else "non_numeric", name, ok))
            try:
                if name == layout.label:
                    col = pc.cast(col, pa.int64())
                elif name in layout.numeric_sources:
                    col = pc.cast(col, pa.float64())
                elif name in layout.string_sources:
                    col = pc.cast(col, pa.string())   # "" means missing, as in the CSV readers
                    col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(path, f"cannot convert ({e})".splitlines()[0], field=name) from None
            cols[name] = col
        n = batch.num_rows
        stats.rows_read += n
        if layout.label:
            lab = pc.fill_null(pc.is_in(cols[layout.label],
                                        value_set=pa.array([0, 1], pa.int64())), False)
            checks.append(("bad_label", layout.label, lab))
        checks += _value_checks(cols, layout)
        batch = pa.RecordBatch.from_arrays(list(cols.values()), names=list(cols))
        if skip_bad:
            keep = _keep(checks, stats)
            batch = batch if keep is None else batch.filter(keep)
        else:
            for reason, c, ok in checks:
                bad = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
                if len(bad):
                    value = str(texts.get(c, cols[c])[int(bad[0])].as_py())
                    raise DataError(path, _MESSAGES[reason].format(value),
                                    line=row0 + int(bad[0]) + 1, field=c)
        row0 += n
        yield batch


def _number_problem(text: str) -> Optional[str]:
    if not re.match(_NUMBER, text):
        return "non_numeric"
    return "non_finite" if math.isinf(float(text)) else None


def _too_large(text: str) -> bool:
    try:
        return abs(float(text)) > FLOAT32_MAX
    except ValueError:   # (empty or missing: filled later)
        return False


def diagnose(path: Path, layout: Layout, arrow_msg: str) -> DataError:
    """Re-read the file with Python's csv module to locate the first bad line and field; the
    checks mirror the fast path's."""
    names = layout.column_names
    hours: Dict[str, bool] = {}
    line = 0
    try:
        with open_text(path) as lines:
            rows = csv.reader(lines, delimiter=layout.delimiter,
                              quoting=csv.QUOTE_MINIMAL if layout.quoting else csv.QUOTE_NONE)
            for row in rows:
                start, line = line + 1, rows.line_num   # (a quoted field may span lines)
                if line == 1 and layout.header:
                    names = names or [c.strip() for c in row]
                    continue
                if not row:
                    continue
                if names is None:
                    break
                if len(row) != len(names):
                    hint = delimiter_hint(row[0], layout.delimiter) if len(row) == 1 else ""
                    return DataError(path, f"expected {len(names)} columns, got {len(row)}{hint}",
                                     line=start)
                rec = dict(zip(names, row))
                lab = rec.get(layout.label, "").strip() if layout.label else "0"
                if lab not in ("0", "1"):
                    return DataError(path, _MESSAGES["bad_label"].format(lab), line=start,
                                     field=layout.label)
                for c in layout.numeric_sources:
                    v = rec.get(c, "").strip()
                    problem = None if v in NULLS else _number_problem(v)
                    if not problem and c in layout.float32_sources and _too_large(v):
                        problem = "too_large"
                    if problem:
                        return DataError(path, _MESSAGES[problem].format(v), line=start, field=c)
                for c in layout.hour_sources:
                    v = rec.get(c, "")
                    if v not in NULLS and v not in hours:
                        hours[v] = len(_bad_hours(pa.array([v]))) == 0
                    if v not in NULLS and not hours[v]:
                        return DataError(path, _MESSAGES["bad_hour"].format(v), line=start, field=c)
    except DataError as e:   # bytes that are not UTF-8
        return e
    except EOFError:
        return DataError(path, f"truncated {compression(path)} stream (ends after line {line})")
    except (OSError, csv.Error) as e:
        return DataError(path, f"unreadable ({e})")
    first = arrow_msg.strip().splitlines()[0] if arrow_msg.strip() else "unreadable"
    return DataError(path, first)
