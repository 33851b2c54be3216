#!/usr/bin/env python3
"""Prepare at growing sizes: peak memory and speed of `ctrkit prepare` against a plain read.

    python bench/prepare_scale.py CONFIG [--rows 1000000,4000000,16000000] [--vocab count,hash]
        [--hash-buckets 1000000] [--data DIR] [--work DIR] [--out DIR] [--tree DIR] [--set K=V]

For each row count the shared generator (../shared/tools/gen_criteo_like.py, the same one for
every size: the 1M-row file is the reference data) writes DATA/rows_<n>/train.tsv once. For each
vocabulary rule (`count`: fitted vocabularies, min_count from CONFIG; `hash`: `hash_buckets` ids
per feature, no counting pass) a fresh `ctrkit prepare` runs in a process of its own under
/usr/bin/time, which gives its peak RSS; its own time (schema.json's `seconds`, without the
interpreter's start-up and imports: `wall_*` include them) gives rows/s. pyarrow's plain
`read_csv` of the same file, in another process right before it, gives the read speed the ratio
is against (the CPU's speed drifts: each ratio is from one pair run back to back). `--tree`
prepares with another checkout of ctrkit (the code before streaming prepare, say), as `old`.
One result file per (rows, vocabulary), OUT/prepare_<vocab>_<rows>.json; a finished one is
skipped.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import bench_args
from ctrkit.data.preprocess import PREPARED
from fixed_runs import write_json

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT.parent / "shared" / "tools" / "gen_criteo_like.py"
READ = """import sys, time, pyarrow.csv as c
t = time.perf_counter()
n = c.read_csv(sys.argv[1], read_options=c.ReadOptions(autogenerate_column_names=True),
               parse_options=c.ParseOptions(delimiter="\\t")).num_rows
print(n / (time.perf_counter() - t))
"""


def _data(folder: Path, rows: int) -> Path:
    """The generator's train.tsv of `rows` rows (written once)."""
    path = folder / f"rows_{rows}" / "train.tsv"
    if not path.is_file():
        subprocess.run([sys.executable, str(GENERATOR), "--out-dir", str(path.parent),
                        "--rows", str(rows), "--valid-rows", "1000"], check=True)
    return path


def _timed(cmd: List[str], cwd: Path, env: Optional[dict] = None) -> tuple:
    """(wall seconds, peak RSS MB, stdout) of a command run under /usr/bin/time."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "PEAK_KB %M", *cmd], cwd=cwd, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    peak = int(re.findall(r"PEAK_KB (\d+)", r.stderr)[-1]) / 1024
    return wall, peak, r.stdout


def measure(args, rows: int, vocab: str) -> dict:
    path = _data(args.data, rows)
    read_rows_per_s = float(_timed([sys.executable, "-c", READ, str(path)], ROOT)[2])
    out = args.work / f"prep_{vocab}_{rows}"
    keys = [f"data.train={path}", "data.valid=null", "data.test=null",   # (overwrite: a fresh
            f"data.prepared_dir={out}", "data.overwrite=true", *args.overrides]   # prepare)
    if vocab == "hash":
        keys += ["data.vocab=hash", f"data.hash_buckets={args.hash_buckets}"]
    tree = args.tree or ROOT
    env = dict(os.environ, PYTHONPATH=str(tree))
    wall, peak, _ = _timed([sys.executable, "-m", "ctrkit", "prepare", str(args.config.resolve()),
                            *keys, "--quiet"], tree, env)
    schema = json.loads((out / "schema.json").read_text())
    note = bench_args.remove_owned_folder(out, PREPARED)   # (only what ctrkit wrote there)
    if note:
        print(f"prepare_scale: {note}", file=sys.stderr)
    vocab_values = sum(f["vocab_size"] - 2 for f in schema["features"] if f["kind"] == "sparse")
    own = float(schema.get("seconds") or wall)   # prepare's own time, without the start-up
    return {"rows": rows, "vocab": vocab, "code": str(tree), "file_mb": round(path.stat().st_size / 2**20),
            "peak_rss_mb": round(peak), "wall_s": round(wall, 2), "prepare_s": round(own, 2),
            "prepare_rows_per_s": round(rows / own), "wall_rows_per_s": round(rows / wall),
            "read_rows_per_s": round(read_rows_per_s),
            "prepare_over_read": round(rows / own / read_rows_per_s, 3),
            "wall_over_read": round(rows / wall / read_rows_per_s, 3),
            "vocabulary_values": vocab_values,
            "hash_buckets": args.hash_buckets if vocab == "hash" else None,
            "host": platform.node(), "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def count_or_hash(name: str) -> str:
    if name not in ("count", "hash"):
        raise ValueError(name)
    return name


def build_parser() -> bench_args.Parser:
    p = bench_args.parser("bench/prepare_scale.py", __doc__.splitlines()[1])
    p.add_argument("--rows", type=bench_args.comma_list(int, "--rows"),
                   default=[1_000_000, 4_000_000, 16_000_000])
    p.add_argument("--vocab", type=bench_args.comma_list(count_or_hash, "--vocab"),
                   default=["count", "hash"], help="vocabulary rules: count, hash")
    p.add_argument("--hash-buckets", type=bench_args.count(1), default=1_000_000)
    p.add_argument("--data", type=Path, default=Path("runs/prepare_scale/data"),
                   help="the generated files (kept for the next run)")
    p.add_argument("--work", type=Path, default=Path("runs/prepare_scale/work"))
    p.add_argument("--out", type=Path, default=Path("bench/results/prepare_scale"))
    p.add_argument("--tree", type=Path, default=None,
                   help="another ctrkit checkout to prepare with (results named prepare_old_*)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = bench_args.parse(build_parser(), argv)
    if isinstance(args, int):
        return args

    def body() -> dict:
        bench_args.load(args)   # (a bad config or --set is one line, before any work)
        for d in (args.out, args.work, args.data):
            d.mkdir(parents=True, exist_ok=True)
        args.data, args.work = args.data.resolve(), args.work.resolve()   # (--tree runs elsewhere)
        done = {}
        for rows in args.rows:
            for vocab in args.vocab:
                name = f"prepare_{'old_' if args.tree else ''}{vocab}_{rows}"
                path = args.out / f"{name}.json"
                if path.is_file():
                    print(f"prepare_scale: {path} done earlier, skipped", file=sys.stderr)
                    continue
                done[name] = result = measure(args, rows, vocab)
                write_json(path, result)
                print(f"prepare_scale: {name}: peak {result['peak_rss_mb']} MB, "
                      f"{result['prepare_rows_per_s']} rows/s, "
                      f"{result['prepare_over_read']} of the read", file=sys.stderr)
        return done
    return bench_args.run("bench/prepare_scale.py", body)


if __name__ == "__main__":
    sys.exit(main())
