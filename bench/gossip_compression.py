#!/usr/bin/env python3
"""Compressed gossip: final AUC and logloss against bytes sent, for `choco` compressor settings
and the reference algorithms, n workers, the same samples for every run.

    python bench/gossip_compression.py CONFIG [--out DIR] [--workers 4,8]
        [--compressors SPEC@GAMMA,...] [--algorithms allreduce,damsgrad,dpsgd,local]
        [--samples N] [--set KEY=VALUE ...]

Each `--compressors` entry is a `distributed.compressor` spec with an optional `@gamma` (default:
the config's `distributed.gamma`) and is one `choco` run; each `--algorithms` entry is one
reference run (dpsgd is plain SGD at lr 0.05, unscaled). A run with n workers takes
samples / (n x batch) steps (default samples: half an epoch of the training split), through
`ctrkit.train`, in `train.run_dir/<run>-n<n>`; its checkpoints are removed afterwards.

Writes DIR/compression.json (rewritten after every run with "partial": true, so a killed sweep
keeps what it measured) and DIR/compression.png (AUC against bytes, one panel per n).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ctrkit.config import Config

import bench_args
from fixed_runs import DPSGD_LR, run_config, run_one, train_rows, write_json

REFERENCES = ("allreduce", "damsgrad", "dpsgd", "local")
SETTINGS = ("topk:0.01+int8@0.3", "topk:0.01+int8@0.6", "topk:0.03+int8@0.5")
REFERENCE_LINES = (("damsgrad", "--"), ("allreduce", "-"), ("dpsgd", ":"), ("local", "-."))
TABLE_KEYS = ("algorithm", "compressor", "gamma", "workers", "final_auc",
              "total_bytes_per_worker", "bytes_vs_damsgrad")


def plan(cfg: Config, settings: Sequence[str],
         references: Sequence[str]) -> List[Tuple[str, str, dict]]:
    """(tag, algorithm, distributed overrides) of every run: the references first, then one
    choco run per `spec@gamma` setting (tag choco-SPEC-gGAMMA)."""
    runs = [(a, a, {}) for a in references]
    for spec in settings:
        comp, _, gamma = spec.partition("@")
        over = {"compressor": comp, "gamma": float(gamma or cfg.distributed.gamma)}
        runs.append((f"choco-{comp}-g{over['gamma']}", "choco", over))
    return runs


def compare_to_damsgrad(runs: List[dict]) -> None:
    """Add bytes_vs_damsgrad and auc_vs_damsgrad to every run with an exact damsgrad run (that
    sent bytes) at the same number of workers."""
    for r in runs:
        ref = next((x for x in runs if x["algorithm"] == "damsgrad"
                    and x["workers"] == r["workers"]), None)
        if ref and ref["total_bytes_per_worker"]:
            r["bytes_vs_damsgrad"] = r["total_bytes_per_worker"] / ref["total_bytes_per_worker"]
            r["auc_vs_damsgrad"] = r["final_auc"] - ref["final_auc"]


def run_compression(cfg: Config, out: Path, workers: Sequence[int] = (4, 8),
                    settings: Sequence[str] = SETTINGS, references: Sequence[str] = REFERENCES,
                    samples: int = 0) -> Dict[str, object]:
    """Train every run of the sweep (all configs are built, i.e. checked, before the first run);
    returns the summary printed by the program."""
    out.mkdir(parents=True, exist_ok=True)
    rows = train_rows(cfg)
    bs = cfg.train.batch_size
    samples = samples or rows // 2
    todo = []
    for n in workers:
        steps = max(1, samples // (n * bs))
        for tag, algo, over in plan(cfg, settings, references):
            run_dir = Path(cfg.train.run_dir) / f"{tag.replace(':', '')}-n{n}"
            todo.append((tag, run_config(cfg, run_dir, algo, n, steps, **over), over))
    runs: List[dict] = []
    for tag, c, over in todo:
        r = run_one(c)
        r.update(over)
        runs.append(r)
        write_json(out / "compression.json", {"runs": runs, "partial": True})   # survives a kill
        print(f"compression: n={r['workers']} {tag:32s} AUC {r['final_auc']:.4f} logloss "
              f"{r['final_logloss']:.4f} {r['total_bytes_per_worker'] / 2**20:9.1f} MB/worker "
              f"({r['wall_s']} s)", flush=True)
    compare_to_damsgrad(runs)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "batch_per_worker": bs,
              "samples": samples, "topology": cfg.distributed.topology,
              "lr_scaling": cfg.distributed.lr_scaling, "dpsgd_lr": DPSGD_LR, "runs": runs}
    write_json(out / "compression.json", result)
    plot(result, out / "compression.png")
    return {k: v for k, v in result.items() if k != "runs"} | {
        "table": [{k: r.get(k) for k in TABLE_KEYS} for r in runs],
        "written_to": str(out / "compression.json")}


def plot(result: dict, path: Path) -> None:
    """One panel per number of workers: each choco setting's AUC at its bytes sent (log x), the
    references as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = sorted({r["workers"] for r in result["runs"]})
    fig, axes = plt.subplots(1, max(1, len(ns)), figsize=(6.5 * max(1, len(ns)), 4.5),
                             squeeze=False)
    for ax, n in zip(axes[0], ns):
        rs = [r for r in result["runs"] if r["workers"] == n]
        for r in rs:
            if r["algorithm"] == "choco":
                x = max(r["total_bytes_per_worker"], 1.0)
                ax.scatter([x], [r["final_auc"]])
                ax.annotate(f"{r['compressor']} g={r['gamma']}", (x, r["final_auc"]), fontsize=7)
        for algo, style in REFERENCE_LINES:
            ref = next((r for r in rs if r["algorithm"] == algo), None)
            if ref:
                ax.axhline(ref["final_auc"], ls=style, color="grey", lw=1,
                           label=f"{algo} ({ref['total_bytes_per_worker'] / 2**20:.0f} MB)")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per worker (whole run)")
        ax.set_ylabel("final AUC (averaged model)")
        ax.set_title(f"{n} workers, {result['topology']}, {result['samples']:,} samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> bench_args.Parser:
    p = bench_args.parser("bench/gossip_compression.py", __doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/compression"),
                   help="result folder (compression.json, compression.png)")
    p.add_argument("--workers", type=bench_args.comma_list(int, "--workers"), default="4,8",
                   help="numbers of workers, comma-separated")
    p.add_argument("--compressors", type=bench_args.comma_list(str, "--compressors", True),
                   default=",".join(SETTINGS),
                   help="choco runs: comma-separated SPEC@GAMMA ('' for none)")
    p.add_argument("--algorithms", type=bench_args.comma_list(str, "--algorithms", True),
                   default=",".join(REFERENCES),
                   help="reference runs, comma-separated ('' for none)")
    p.add_argument("--samples", type=bench_args.count(0), default=0,
                   help="training samples per run (0: half an epoch of the training split)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = bench_args.parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    return bench_args.run("bench/gossip_compression.py", lambda: run_compression(
        bench_args.load(args), args.out, workers=args.workers, settings=args.compressors,
        references=args.algorithms, samples=args.samples))


if __name__ == "__main__":
    sys.exit(main())
