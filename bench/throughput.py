#!/usr/bin/env python3
"""Training throughput: steady-state step cost, peak memory, prepare speed.

    python bench/throughput.py CONFIG [--out FILE] [--rounds 7] [--steps 3] [--threads 1,2]
        [--set KEY=VALUE ...]

This host's CPU speed drifts several-fold within minutes, so every target is a *ratio* of variants
measured in the same process with the variants alternated round by round (median over rounds):
- full step (data loading included) / dense part alone (MLP + FM on precomputed embedding tensors
  of the same shape, with its Adam step; 8 of them used in turn, so that, like real batches, they
  are not in the 32 MB L3 cache when a step starts);
- full step with 10M embedding rows / full step with 10k rows (same data, ids folded into the
  tables);
- full step with train.ema_decay's weight average / plain full step;
- `prepare` rows/s / pyarrow's plain CSV read rows/s of the same file.

The full step is the trainer's own: each variant builds a `Trainer` from the config and times its
`train_step` on batches of ctrkit's loader. The config's `distributed` section is ignored (one
process, the configured optimizers). Writes one JSON file (`--out`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

import ctrkit
from ctrkit.config import Config
from ctrkit.data.loader import Batch, BatchLoader
from ctrkit.data.preprocess import open_prepared, split_files
from ctrkit.data.schema import Schema
from ctrkit.distributed.runtime import DistEnv
from ctrkit.errors import CtrkitError
from ctrkit.models import build_model
from ctrkit.models.layers import fm_interaction
from ctrkit.ownership import OwnedFolder
from ctrkit.distributed.device import resolve_device, use_device
from ctrkit.train.memory import keep_freed_memory
from ctrkit.train.trainer import Trainer

import bench_args
from fixed_runs import write_json

DENSE_POOL = 8   # 8 x 7 MB of embeddings: more than this CPU's cache
PREFETCH = 4     # batches the loader prepares ahead, as train.prefetch's default


@dataclasses.dataclass
class Variant:
    """One measured variant: `step()` runs one training step; `times` are seconds per step, one
    entry per round."""
    name: str
    step: Callable[[], None]
    times: List[float] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------- the full step
def schema_with_rows(schema: Schema, total_rows: int) -> Schema:
    """A copy of `schema` whose tables have `total_rows` rows in all (at least 2 each)."""
    s = copy.deepcopy(schema)
    per = max(2, total_rows // max(1, len(s.sparse)))
    for f in s.sparse:
        f.vocab_size = per
    return s


def fold_ids(loader: BatchLoader, rows_per_table: int) -> None:
    """Fold the ids of the loader's shards into tables of `rows_per_table` rows (id % rows).

    Done once, in memory, before the loader runs: its batches, and the id work it does for each
    (distinct ids, in its prefetch thread), are then exactly those of real training."""
    loader.shards = [dataclasses.replace(sh, sparse=(sh.sparse % rows_per_table).astype(
        sh.sparse.dtype, copy=False)) for sh in loader.shards]


def endless(loader: BatchLoader) -> Iterator[Batch]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader
        loader.set_position(loader.epoch + 1)


def variant_config(cfg: Config, ema_decay: float) -> Config:
    """The config a variant's Trainer is built from: one process (the default `distributed`
    section: the configured optimizers, nothing sent) and `train.ema_decay` = `ema_decay`."""
    return cfg.model_copy(update={"distributed": type(cfg.distributed)(),
                                  "train": cfg.train.model_copy(update={"ema_decay": ema_decay})})


def full_variant(cfg: Config, schema: Schema, run_dir: Path, total_rows: Optional[int] = None,
                 device: torch.device = torch.device("cpu"), ema_decay: float = 0.0) -> Variant:
    """The trainer's whole training step (`Trainer.train_step`, data loading included); tables of
    the data's own sizes, or `total_rows` rows in all; with `ema_decay` also the weight average's
    update (train.ema_decay). `run_dir` is only named: nothing is saved."""
    s = schema if total_rows is None else schema_with_rows(schema, total_rows)
    trainer = Trainer(variant_config(cfg, ema_decay), s, run_dir, DistEnv(device=device))
    trainer.model.train()
    loader = BatchLoader(schema, "train", cfg.train.batch_size, shuffle=True, seed=0,
                         drop_last=True, prefetch=PREFETCH, pin_memory=device.type == "cuda")
    if total_rows is not None:
        fold_ids(loader, s.sparse[0].vocab_size)
    batches = endless(loader)
    name = "full" if total_rows is None else f"full_{total_rows}_rows"
    return Variant(name + ("_ema" if ema_decay else ""),
                   lambda: trainer.train_step(next(batches)))


# ------------------------------------------------------------------------ the dense part
def dense_variant(cfg: Config, schema: Schema, input_grad: bool = True,
                  device: torch.device = torch.device("cpu")) -> Variant:
    """DeepFM's dense part alone on a precomputed embedding tensor of the same shape.

    With `input_grad` its backward also computes the gradient of its embedding input, as the dense
    part of any model with trained embeddings must (that GEMM is matrix work, not embedding
    overhead); without it, the number for a dense part on frozen embeddings is reported too."""
    bs = cfg.train.batch_size
    torch.manual_seed(0)
    model = build_model(cfg.model, schema_with_rows(schema, 10_000)).to(device)
    mlp = model.mlp
    n_fields, dim = len(schema.sparse), model.dim
    # Several precomputed batches used in turn: like real batches (and unlike one reused tensor)
    # they are not sitting in the CPU cache when a step starts.
    pool = [((torch.randn(bs, n_fields, dim, device=device) * 0.01).requires_grad_(input_grad),
             torch.randn(bs, len(schema.dense), device=device),
             (torch.rand(bs, device=device) < 0.25).float())
            for _ in range(DENSE_POOL)]
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3, fused=True)
    state = {"i": 0}

    def step() -> None:
        emb, dense, labels = pool[state["i"] % DENSE_POOL]
        state["i"] += 1
        logits = mlp(emb.reshape(bs, -1), dense).squeeze(1) + fm_interaction(emb)
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        emb.grad = None
    return Variant("dense_only" if input_grad else "dense_only_frozen_input", step)


# ---------------------------------------------------------------------------- measuring
def alternate(variants: Sequence[Variant], rounds: int, steps_per_round: int,
              device: torch.device = torch.device("cpu")) -> None:
    """Two warm-up steps each (allocations, lazy state), then `rounds` rounds in which every
    variant in turn runs `steps_per_round` steps; each round's seconds per step go to `times`."""
    def sync() -> None:   # a GPU step is timed to the end of its queued kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for v in variants:
        for _ in range(2):
            v.step()
    for _ in range(rounds):
        for v in variants:
            sync()
            t = time.perf_counter()
            for _ in range(steps_per_round):
                v.step()
            sync()
            v.times.append((time.perf_counter() - t) / steps_per_round)


def median_ratio(a: Variant, b: Variant) -> float:
    """The median over rounds of a's time over b's time in the same round."""
    return round(statistics.median(x / y for x, y in zip(a.times, b.times)), 3)


def measure_steps(cfg: Config, schema: Schema, threads: int, rounds: int, steps_per_round: int,
                  run_dir: Path, small_rows: int = 10_000, big_rows: int = 10_000_000,
                  device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    """Every variant's step time at `threads` torch threads, and the ratios of the targets."""
    torch.set_num_threads(threads)
    keep_freed_memory()   # as `ctrkit train` does
    bs = cfg.train.batch_size
    dense = dense_variant(cfg, schema, device=device)
    full = full_variant(cfg, schema, run_dir, None, device)
    small = full_variant(cfg, schema, run_dir, small_rows, device)
    big = full_variant(cfg, schema, run_dir, big_rows, device)
    frozen = dense_variant(cfg, schema, input_grad=False, device=device)
    ema = full_variant(cfg, schema, run_dir, None, device,
                       ema_decay=cfg.train.ema_decay or 0.95)
    variants = [dense, full, small, big, frozen, ema]
    alternate(variants, rounds, steps_per_round, device)
    med = {v.name: statistics.median(v.times) for v in variants}
    return {
        "device": str(device), "threads": threads,
        "step_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
        "samples_per_s": {k: round(bs / v) for k, v in med.items()},
        "full_over_dense": median_ratio(full, dense),
        "big_over_small_tables": median_ratio(big, small),
        "full_over_dense_frozen_input": median_ratio(full, frozen),
        # the step with train.ema_decay's weight average over the plain full step
        "full_ema_over_full": median_ratio(ema, full),
        "rounds": rounds, "steps_per_round": steps_per_round,
    }


def measure_prepare(cfg: Config, out_dir: Path, rounds: int = 7) -> Dict[str, object]:
    """prepare (vocab + encode + write, train split only) vs pyarrow's plain CSV read, alternated
    round by round; each round's prepared folder is removed again (only what prepare wrote)."""
    import pyarrow.csv as pacsv
    path = split_files(cfg.data.train)[0]
    delim = "\t" if cfg.data.format == "criteo_tsv" else ","
    rows = 0
    t_read, t_prep = [], []
    for r in range(rounds):
        t = time.perf_counter()
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True),
                               parse_options=pacsv.ParseOptions(delimiter=delim))
        t_read.append(time.perf_counter() - t)
        rows = table.num_rows
        del table
        pdir = out_dir / f"prepare_bench_{r}"
        c = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "valid": None, "test": None, "prepared_dir": str(pdir), "overwrite": True})})
        t = time.perf_counter()
        ctrkit.prepare(c, progress=False)
        t_prep.append(time.perf_counter() - t)
        OwnedFolder(pdir, "prepared folder").clear()
    ratios = [a / b for a, b in zip(t_read, t_prep)]
    return {"file": str(path), "rows": rows,
            "pyarrow_read_rows_per_s": round(rows / statistics.median(t_read)),
            "prepare_rows_per_s": round(rows / statistics.median(t_prep)),
            "prepare_over_read": round(statistics.median(ratios), 3)}


def run_throughput(cfg: Config, out: Path, rounds: int = 7, steps: int = 3,
                   threads: Optional[Sequence[int]] = None, small_rows: int = 10_000,
                   big_rows: int = 10_000_000, prepare_rounds: int = 7,
                   progress: bool = True) -> Dict[str, object]:
    """The whole benchmark; writes `out` and returns what it wrote plus `written_to`.

    `threads`: torch thread counts to measure at (default: 1 and 2 on the CPU, as this 2-core
    host has; a GPU is measured once, with the host's cores for the loader and the Python side).
    The prepare measurement runs on the CPU only (host work)."""
    if not cfg.data.train:
        raise CtrkitError("bench/throughput.py needs a data config (e.g. "
                          "configs/bench_throughput.yaml)")
    out.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    use_device(device)
    threads = list(threads or ((1, 2) if device.type == "cpu" else (os.cpu_count() or 1,)))
    with open_prepared(cfg, progress) as schema:
        result: Dict[str, object] = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "host": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "batch_size": cfg.train.batch_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": cfg.model.model_dump(), "sparse_optimizer": cfg.optimizer.sparse.name,
            "tables": len(schema.sparse),
            "vocabulary_rows": sum(f.vocab_size for f in schema.sparse),
            "train_rows": schema.splits["train"].rows_written,
            "steps": [measure_steps(cfg, schema, t, rounds, steps, out.parent / "throughput_run",
                                    small_rows, big_rows, device) for t in threads],
        }
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if device.type == "cpu":
        result["prepare"] = measure_prepare(cfg, out.parent, prepare_rounds)
    else:
        result["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    write_json(out, result)
    return result | {"written_to": str(out)}


def build_parser() -> bench_args.Parser:
    p = bench_args.parser("bench/throughput.py", __doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out/throughput.json"),
                   help="result file (JSON)")
    p.add_argument("--rounds", type=bench_args.count(1), default=7,
                   help="rounds of alternated variants (the ratios are medians over rounds)")
    p.add_argument("--steps", type=bench_args.count(1), default=3,
                   help="steps of each variant per round")
    p.add_argument("--threads", type=bench_args.comma_list(int, "--threads"), default=None,
                   help="torch thread counts, comma-separated (default: 1,2 on the CPU; the "
                        "host's cores on a GPU)")
    p.add_argument("--small-rows", type=bench_args.count(2), default=10_000,
                   help="embedding rows in all of the small-tables variant")
    p.add_argument("--big-rows", type=bench_args.count(2), default=10_000_000,
                   help="embedding rows in all of the big-tables variant")
    p.add_argument("--prepare-rounds", type=bench_args.count(1), default=7,
                   help="rounds of prepare vs read (CPU runs only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar when preparing the data")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = bench_args.parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    return bench_args.run("bench/throughput.py", lambda: run_throughput(
        bench_args.load(args), args.out, rounds=args.rounds, steps=args.steps,
        threads=args.threads, small_rows=args.small_rows, big_rows=args.big_rows,
        prepare_rounds=args.prepare_rounds, progress=not args.quiet))


if __name__ == "__main__":
    sys.exit(main())
