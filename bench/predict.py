#!/usr/bin/env python3
"""Serving speed: `ctrkit predict` end to end, and the exported model's latency.

    python bench/predict.py CONFIG [--run RUN] [--input FILE] [--out DIR] [--work DIR]
        [--threads 1,2] [--rounds 5] [--train-steps 200] [--set KEY=VALUE ...]

With `--run` the run's model is measured; without, a model is trained from CONFIG for
`--train-steps` steps into WORK/run first (WORK also holds the scores and the export). At each thread count, alternated round by round (this
host's CPU speed drifts several-fold within minutes, so the targets are ratios within a round):
- predict: `Predictor.predict_files` from the raw file (default: the config's data.valid) to a
  Parquet file, rows/s end to end (reading, encoding with the run's vocabularies, scoring,
  writing; the model is loaded once, outside the timing);
- predict_bf16: the same with `precision="bf16"` (matrix products in bfloat16), and how far its
  scores and AUC are from fp32's on the whole file;
- read: pyarrow's plain CSV read of the same file (pyarrow.csv.read_csv, every column);
  pyarrow's thread pool has the same number of threads as torch for all of these;
- train: the trainer's own training step of the same model (`Trainer.train_step`, data loading
  included; bench/throughput.py's full step) in samples/s.
- bf16's stages alone, one after another (ctrkit's reader, encoding, the forward), rows/s each:
  where predict's time goes, and the bound they set.
Targets: predict/read >= 0.3, predict/train >= 3 (each reported for fp32 and bf16). Then the exported program (ctrkit export:
model.pt2, run with torch alone; exported afresh by each bench process) at batch 1, 32 and 512:
p50 and p99 latency of a call.
One result file per measurement and thread count, DIR/predict_t<threads>.json and
DIR/latency_t<threads>.json; a finished one is skipped.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

import bench_args
from fixed_runs import write_json
from throughput import alternate, full_variant

LATENCY_BATCHES = (1, 32, 512)


def _read_rows_per_s(path: Path, delim: str) -> float:
    import pyarrow.csv as pacsv
    t = time.perf_counter()
    table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True),
                           parse_options=pacsv.ParseOptions(delimiter=delim))
    return table.num_rows / (time.perf_counter() - t)


def _predict_rows_per_s(predictor, path: Path, out: Path) -> float:
    target = out / "scores.parquet"
    s = predictor.predict_files([str(path)], target, progress=False)
    target.unlink()
    return s.rows_read / s.seconds


def _stage_rates(predictor, path: Path) -> Dict[str, float]:
    """rows/s of predict's stages run alone, one after another in this thread: ctrkit's reader
    (predict's layout and blocks), encoding with the run's vocabularies, and scoring the encoded
    rows (the forward, no writing)."""
    from ctrkit.data.reader import ReadStats, iter_batches
    from ctrkit.serving.predict import READ_BLOCK_MB
    layout = predictor._file_layout(path)
    t0 = time.perf_counter()
    batches = list(iter_batches(path, layout, READ_BLOCK_MB, ReadStats(), whole_file_mb=0))
    t1 = time.perf_counter()
    encoded = list(predictor._encoded(iter(batches), layout))
    t2 = time.perf_counter()
    for _, sparse, dense, _, multi in encoded:
        predictor._score(sparse, dense, multi)
    t3 = time.perf_counter()
    n = sum(b.num_rows for b in batches)
    return {"reader": n / (t1 - t0), "encode": n / (t2 - t1), "forward": n / (t3 - t2)}


def _agreement(fp32, bf16, path: Path, out: Path) -> dict:
    """How far bf16's scores of the file are from fp32's: max and mean |difference|, both AUCs."""
    import pyarrow.parquet as pq
    scores, aucs = [], []
    for name, predictor in (("fp32", fp32), ("bf16", bf16)):
        target = out / f"scores_{name}.parquet"
        s = predictor.predict_files([str(path)], target, progress=False)
        scores.append(pq.read_table(target).column("probability").to_numpy())
        aucs.append(s.metrics["auc"] if s.metrics else None)
        target.unlink()
    diff = np.abs(scores[0] - scores[1])
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "auc_fp32": aucs[0], "auc_bf16": aucs[1]}


def _train_samples_per_s(cfg, schema, work: Path, steps: int = 3):
    v = full_variant(cfg, schema, work / "train_step_unused")
    batch = cfg.train.batch_size

    def measure() -> float:
        v.times.clear()
        alternate([v], rounds=1, steps_per_round=steps)
        return batch / v.times[0]
    alternate([v], rounds=1, steps_per_round=1)   # (warm-up)
    return measure


def latency(program, schema, batches=LATENCY_BATCHES, calls: int = 200) -> Dict[str, dict]:
    """p50/p99 milliseconds of one call of the exported program per batch size (random ids in
    each table's range, random dense values)."""
    out = {}
    rng = np.random.default_rng(0)
    sizes = np.array([f.vocab_size for f in schema.sparse])
    for b in batches:
        ids = torch.from_numpy((rng.random((b, len(sizes))) * sizes).astype(np.int64))
        dense = torch.from_numpy(rng.random((b, len(schema.dense)), dtype=np.float32))
        with torch.no_grad():
            for _ in range(10):
                program(dense, ids)
            times = []
            for _ in range(calls if b < 512 else calls // 4):
                t = time.perf_counter()
                program(dense, ids)
                times.append((time.perf_counter() - t) * 1e3)
        out[str(b)] = {"p50_ms": round(float(np.percentile(times, 50)), 3),
                       "p99_ms": round(float(np.percentile(times, 99)), 3), "calls": len(times)}
    return out


def measure(cfg, run: Path, input_path: Path, out: Path, threads: int, rounds: int) -> dict:
    from ctrkit.data.preprocess import open_prepared
    from ctrkit.serving.predict import Predictor, _scoring_threads
    import pyarrow as pa
    torch.set_num_threads(threads)
    pa.set_cpu_count(threads)
    predictor = Predictor.load(run)
    bf16 = Predictor.load(run, precision="bf16")
    delim = "\t" if cfg.data.format == "criteo_tsv" else ","
    with open_prepared(cfg, progress=False) as schema:
        train_rate = _train_samples_per_s(cfg, schema, out)
        rows: Dict[str, List[float]] = {"predict": [], "predict_bf16": [], "read": [], "train": [],
                                        "bf16_reader": [], "bf16_encode": [], "bf16_forward": []}
        for _ in range(rounds):
            rows["read"].append(_read_rows_per_s(input_path, delim))
            rows["predict"].append(_predict_rows_per_s(predictor, input_path, out))
            rows["predict_bf16"].append(_predict_rows_per_s(bf16, input_path, out))
            rows["train"].append(train_rate())
            with _scoring_threads(True):   # (the threads bf16 scoring has inside predict)
                for stage, rate in _stage_rates(bf16, input_path).items():
                    rows[f"bf16_{stage}"].append(rate)
    ratio = lambda a, b: round(statistics.median(x / y for x, y in zip(rows[a], rows[b])), 3)  # noqa: E731
    result = {"threads": threads, "input": str(input_path), "run": str(run),
              "checkpoint": str(predictor.checkpoint), "model": cfg.model.name,
              "train_batch_size": cfg.train.batch_size, "rounds": rounds,
              "rows_per_s": {k: [round(x) for x in v] for k, v in rows.items()},
              "median_rows_per_s": {k: round(statistics.median(v)) for k, v in rows.items()},
              "predict_over_read": ratio("predict", "read"),
              "predict_over_train": ratio("predict", "train"),
              "bf16_over_read": ratio("predict_bf16", "read"),
              "bf16_over_train": ratio("predict_bf16", "train"),
              "bf16_stages_over_read": {k: ratio(f"bf16_{k}", "read")
                                        for k in ("reader", "encode", "forward")},
              "bf16_agreement": _agreement(predictor, bf16, input_path, out),
              "pyarrow_threads": threads,
              "targets": {"predict_over_read": 0.3, "predict_over_train": 3.0},
              "host": platform.node(), "torch": torch.__version__,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    return result


def measure_latency(run: Path, work: Path, threads: int, exported: Dict[Path, str]) -> dict:
    """The exported program at each batch size, exported into WORK/export once per bench run
    (`exported`: folder -> when; an export left by an earlier run may be older code's program)."""
    from ctrkit.serving.export import export_model
    from ctrkit.serving.predict import Predictor
    torch.set_num_threads(threads)
    predictor = Predictor.load(run)
    folder = work / "export"
    if folder not in exported:
        export_model(predictor.model, predictor.schema, folder)
        exported[folder] = time.strftime("%Y-%m-%d %H:%M:%S")
    program = torch.export.load(str(folder / "model.pt2")).module()
    return {"threads": threads, "run": str(run), "checkpoint": str(predictor.checkpoint),
            "program": str(folder / "model.pt2"), "exported": exported[folder],
            "latency": latency(program, predictor.schema),
            "host": platform.node(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def build_parser() -> bench_args.Parser:
    p = bench_args.parser("bench/predict.py", __doc__.splitlines()[1])
    p.add_argument("--run", type=Path, default=None, help="a trained run folder")
    p.add_argument("--input", type=Path, default=None, help="raw file (default: data.valid)")
    p.add_argument("--out", type=Path, default=Path("bench/results/predict"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_predict"),
                   help="the trained run, scores and export (not results)")
    p.add_argument("--threads", type=bench_args.comma_list(int, "--threads"), default=[1, 2])
    p.add_argument("--rounds", type=bench_args.count(1), default=5)
    p.add_argument("--train-steps", type=bench_args.count(1), default=200)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = bench_args.parse(build_parser(), argv)
    if isinstance(args, int):
        return args

    def body() -> dict:
        import ctrkit
        from ctrkit.data.preprocess import split_files
        cfg = bench_args.load(args)
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        run = args.run
        if run is None:
            run = args.work / "run"
            if not (run / "data" / "schema.json").is_file():
                tc = cfg.train.model_copy(update={"run_dir": str(run), "max_steps": args.train_steps,
                                                  "progress": False, "plot": False,
                                                  "tensorboard": False, "overwrite": True})
                ctrkit.train(cfg.model_copy(update={"train": tc}))
        input_path = args.input or split_files(cfg.data.valid)[0]
        done, exported = {}, {}
        jobs = [("predict", lambda t: measure(cfg, run, input_path, args.work, t, args.rounds)),
                ("latency", lambda t: measure_latency(run, args.work, t, exported))]
        for kind, job in jobs:
            for t in args.threads:
                path = args.out / f"{kind}_t{t}.json"
                if path.is_file():
                    print(f"predict: {path} done earlier, skipped", file=sys.stderr)
                    continue
                done[f"{kind}_t{t}"] = result = job(t)
                write_json(path, result)
                print(f"predict: {kind} at {t} threads: " + ", ".join(
                    f"{k} {result[k]}" for k in ("median_rows_per_s", "predict_over_read",
                                                  "predict_over_train", "bf16_over_read",
                                                  "bf16_over_train", "latency") if k in result),
                      file=sys.stderr)
        return done
    return bench_args.run("bench/predict.py", body)


if __name__ == "__main__":
    sys.exit(main())
