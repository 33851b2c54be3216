#!/usr/bin/env python3
"""Shard groups: the same n ranks as replicas (k = 1), as n/k shard groups of k ranks and as one
model-parallel group (k = n); final AUC of the averaged model against embedding bytes per rank.

    python bench/sharding.py CONFIG [--out DIR] [--shards 1,2,4] [--workers 4] [--samples N]
        [--set KEY=VALUE ...]

Every layout runs the config's `distributed.algorithm` (a decentralized one) on the same samples
(default: half an epoch of the training split), through `ctrkit.train`, in
`train.run_dir/<algorithm>-n<n>-k<k>`; its checkpoints are removed afterwards.

Writes DIR/sharding.json (rewritten after every run with "partial": true, so a killed sweep keeps
what it measured).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ctrkit.config import Config
from ctrkit.distributed.sharding import check_grid

import bench_args
from fixed_runs import run_config, run_one, train_rows, write_json

TABLE_KEYS = ("shard_group_size", "final_auc", "auc_vs_replicated",
              "max_embedding_bytes_per_rank", "memory_vs_replicated", "wall_s")


def compare_to_replicas(runs: List[dict]) -> None:
    """Add max_embedding_bytes_per_rank to every run, and its AUC difference and memory ratio
    against the replicated layout (k = 1) when that was run."""
    base = next((r for r in runs if r["shard_group_size"] == 1), None)
    for r in runs:
        r["max_embedding_bytes_per_rank"] = max(r["embedding_bytes_per_rank"])
    for r in runs:
        if base:
            r["auc_vs_replicated"] = r["final_auc"] - base["final_auc"]
            r["memory_vs_replicated"] = (r["max_embedding_bytes_per_rank"]
                                         / base["max_embedding_bytes_per_rank"])


def run_sharding(cfg: Config, out: Path, shard_sizes: Sequence[int] = (1, 2, 4),
                 workers: int = 4, samples: int = 0) -> Dict[str, object]:
    """Train one run per shard group size (all configs are built, i.e. checked, before the first
    run); returns the summary printed by the program."""
    out.mkdir(parents=True, exist_ok=True)
    rows = train_rows(cfg)
    bs = cfg.train.batch_size
    samples = samples or rows // 2
    steps = max(1, samples // (workers * bs))
    algo = cfg.distributed.algorithm
    for k in shard_sizes:
        check_grid(workers, k)
    todo = [(k, run_config(cfg, Path(cfg.train.run_dir) / f"{algo}-n{workers}-k{k}", algo,
                           workers, steps, shard_group_size=k)) for k in shard_sizes]
    runs: List[dict] = []
    for k, c in todo:
        r = run_one(c)
        runs.append(r)
        write_json(out / "sharding.json", {"runs": runs, "partial": True})   # survives a kill
        per_rank = [round(b / 2**20, 1) for b in r["embedding_bytes_per_rank"] or []]
        print(f"sharding: n={workers} k={k} AUC {r['final_auc']:.4f} logloss "
              f"{r['final_logloss']:.4f} embedding MB per rank {per_rank} ({r['wall_s']} s)",
              flush=True)
    compare_to_replicas(runs)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "batch_per_rank": bs,
              "workers": workers, "samples": steps * workers * bs, "algorithm": algo,
              "topology": cfg.distributed.topology, "lr_scaling": cfg.distributed.lr_scaling,
              "runs": runs}
    write_json(out / "sharding.json", result)
    return {k: v for k, v in result.items() if k != "runs"} | {
        "table": [{k: r.get(k) for k in TABLE_KEYS} for r in runs],
        "written_to": str(out / "sharding.json")}


def build_parser() -> bench_args.Parser:
    p = bench_args.parser("bench/sharding.py", __doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/sharding"),
                   help="result folder (sharding.json)")
    p.add_argument("--shards", type=bench_args.comma_list(int, "--shards"), default="1,2,4",
                   help="shard group sizes k, comma-separated (each must divide --workers)")
    p.add_argument("--workers", type=bench_args.count(2), default=4, help="ranks n")
    p.add_argument("--samples", type=bench_args.count(0), default=0,
                   help="training samples per run (0: half an epoch of the training split)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = bench_args.parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    return bench_args.run("bench/sharding.py", lambda: run_sharding(
        bench_args.load(args), args.out, shard_sizes=args.shards, workers=args.workers,
        samples=args.samples))


if __name__ == "__main__":
    sys.exit(main())
