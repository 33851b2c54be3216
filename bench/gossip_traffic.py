#!/usr/bin/env python3
"""Bytes and AUC of the gossip algorithms against allreduce, n workers on a ring (issue 15).

    python bench/gossip_traffic.py CONFIG --out DIR [--workers 4,8] [--runs NAME,...]

Every run trains the same number of samples (`--samples`; steps = samples / (n x batch)) from
CONFIG (the reference data: configs/bench_compression.yaml) and reports the averaged model's
final validation AUC and logloss, the worst worker's AUC, and bytes per worker and step:
`wire_bytes_per_step` (what a rank hands to the network: gossip's messages to its neighbours,
allreduce's share of the ring all-reduce and all-gathers), allreduce's `payload_bytes_per_step`
next to it, and the bytes of every logged interval of the run (from metrics.csv) so one can see
whether traffic grows over the run.

Resumable: one JSON per run (`DIR/<name>_n<n>.json`, written atomically); finished runs are
skipped. The run folders' checkpoints are removed after each run (only files ctrkit recorded).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import ctrkit
from ctrkit.ownership import OwnedFolder, atomic_write_text

# name -> config overrides (on top of CONFIG and the run's workers/steps)
RUNS: Dict[str, List[str]] = {
    "damsgrad_tol0": ["distributed.algorithm=damsgrad", "distributed.gossip_tol=0"],
    "damsgrad_tol0.01": ["distributed.algorithm=damsgrad", "distributed.gossip_tol=0.01"],
    "damsgrad_tol0.03": ["distributed.algorithm=damsgrad", "distributed.gossip_tol=0.03"],
    "damsgrad_tol0.1": ["distributed.algorithm=damsgrad", "distributed.gossip_tol=0.1"],
    "damsgrad_tol0.03_rowwise": ["distributed.algorithm=damsgrad", "distributed.gossip_tol=0.03",
                                 "distributed.rowwise_tracker=true"],
    "choco": ["distributed.algorithm=choco"],
    "choco_gamma0.5": ["distributed.algorithm=choco", "distributed.gamma=0.5"],
    "choco_tol0.1": ["distributed.algorithm=choco", "distributed.gossip_tol=0.1"],
    "choco_topk0.02": ["distributed.algorithm=choco", "distributed.compressor=topk:0.02+int8"],
    "choco_dense_sign": ["distributed.algorithm=choco", "distributed.dense_compressor=sign"],
    "choco_dense_int4": ["distributed.algorithm=choco", "distributed.dense_compressor=int4"],
    "allreduce_auto": ["distributed.algorithm=allreduce", "distributed.lr_scaling=auto"],
    "allreduce_linear": ["distributed.algorithm=allreduce", "distributed.lr_scaling=linear"],
}


def _intervals(run_dir: Path) -> List[dict]:
    """(step, bytes per worker per step within the interval) of the logged training rows."""
    rows = []
    with open(run_dir / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] == "train" and r["bytes_per_worker_step"]:
                rows.append((int(r["step"]), float(r["bytes_per_worker_step"]) * int(r["step"])))
    out, (s0, b0) = [], (0, 0.0)
    for s, b in rows:
        if s > s0:
            out.append({"step": s, "bytes_per_step": (b - b0) / (s - s0)})
            s0, b0 = s, b
    return out


def run_one(config: str, name: str, n: int, samples: int, work: Path, extra: List[str]) -> dict:
    cfg = ctrkit.load_config(config, [f"distributed.workers={n}", "distributed.topology=ring"]
                             + RUNS[name] + extra)
    steps = samples // (n * cfg.train.batch_size)
    run_dir = work / f"{name}_n{n}"
    log_every = max(1, steps // 10)
    cfg = ctrkit.load_config(config, [f"distributed.workers={n}", "distributed.topology=ring"]
                             + RUNS[name] + extra + [
        f"train.run_dir={run_dir}", "train.overwrite=true", f"train.max_steps={steps}",
        f"train.eval_every={steps}", f"train.checkpoint_every={steps}", f"train.log_every={log_every}",
        "train.early_stop.enabled=false", "train.lr_plateau.enabled=false",
        "train.progress=false", "train.tensorboard=false", "train.plot=false"])
    t = time.time()
    m = ctrkit.train(cfg).metrics
    wall = time.time() - t
    intervals = _intervals(run_dir)
    OwnedFolder(run_dir, "run folder").clear(under="checkpoints")
    keep = ("wire_bytes_per_step", "payload_bytes_per_step", "bytes_per_worker_step",
            "embedding_payload_bytes_per_step", "embedding_index_bytes_per_step",
            "dense_payload_bytes_per_step", "dense_index_bytes_per_step", "exact_bytes_per_step",
            "auc_spread", "auc_min", "consensus_embedding", "consensus_dense", "lr_scale")
    return {"name": name, "overrides": RUNS[name] + extra, "workers": n, "steps": steps,
            "samples": steps * n * cfg.train.batch_size, "batch_per_worker": cfg.train.batch_size,
            "final_auc": m["valid"]["auc"], "final_logloss": m["valid"]["logloss"],
            **{k: m[k] for k in keep if k in m}, "intervals": intervals,
            "wall_s": round(wall, 1), "date": time.strftime("%Y-%m-%d %H:%M")}


def table(out: Path) -> str:
    """A markdown table of the runs in `out`: per (run, n), the seeds, the averaged model's final
    AUC (mean, and min-max over seeds), the worst worker's AUC, wire MB per worker-step, and the
    traffic in the first, busiest and last tenth of the run (MB per step)."""
    groups: Dict[tuple, List[dict]] = {}
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        groups.setdefault((r["workers"], r["name"]), []).append(r)
    lines = ["| n | run | seeds | final AUC (mean; min-max) | worst worker AUC | MB / worker-step "
             "(wire) | MB / step: first, busiest, last tenth |", "|---|---|---|---|---|---|---|"]
    for (n, name), rs in sorted(groups.items()):
        auc = [r["final_auc"] for r in rs]
        wire = [r.get("wire_bytes_per_step", r.get("bytes_per_worker_step", 0)) / 1e6 for r in rs]
        iv = [x["bytes_per_step"] / 1e6 for x in rs[0].get("intervals", [])]
        spread = f"; {min(auc):.4f}-{max(auc):.4f}" if len(rs) > 1 else ""
        worst = min(r.get("auc_min", r["final_auc"]) for r in rs)
        tenths = f"{iv[0]:.2f}, {max(iv):.2f}, {iv[-1]:.2f}" if iv else ""
        seeds = ",".join(str(r.get("seed", 0)) for r in rs)
        lines.append(f"| {n} | {name} | {seeds} | {sum(auc) / len(auc):.4f}{spread} | {worst:.4f} "
                     f"| {sum(wire) / len(wire):.2f} | {tenths} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--workers", default="4,8")
    ap.add_argument("--runs", default=",".join(RUNS), help="names from: " + ", ".join(RUNS))
    ap.add_argument("--samples", type=int, default=500_000)
    ap.add_argument("--work", type=Path, default=Path("../runs/bench_gossip_traffic"),
                    help="where the run folders go (their checkpoints are removed after each run)")
    ap.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    ap.add_argument("--seeds", default="0", help="train.seed of each run; seed s > 0 writes "
                    "<name>_n<n>_s<s>.json")
    ap.add_argument("--table", action="store_true",
                    help="print a markdown table of the runs in --out and exit")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.out))
        return 0
    names = a.runs.split(",")
    unknown = [x for x in names if x not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown run {unknown[0]!r}; known: {', '.join(RUNS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    for n, name, seed in ((int(n), name, int(s)) for n in a.workers.split(",") for name in names
                          for s in a.seeds.split(",")):
        path = a.out / (f"{name}_n{n}.json" if seed == 0 else f"{name}_n{n}_s{seed}.json")
        if path.exists():
            print(f"skip {path.name} (done)")
            continue
        r = run_one(a.config, name, n, a.samples, a.work, a.set + [f"train.seed={seed}"])
        r["seed"] = seed
        atomic_write_text(path, json.dumps(r, indent=1) + "\n")
        print(f"{name} n={n} seed {seed}: AUC {r['final_auc']:.4f}, "
              f"{r.get('wire_bytes_per_step', r.get('bytes_per_worker_step', 0)) / 2**20:.2f} "
              f"MiB/worker/step on the wire, {r['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
