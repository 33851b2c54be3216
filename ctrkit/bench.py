"""`ctrkit bench throughput`: steady-state training step cost, peak memory, prepare speed.

This host's CPU speed drifts several-fold within minutes, so every target is a *ratio* of variants
measured in the same process with the variants alternated round by round (median over rounds):
- full step (data loading included) / dense part alone (MLP + FM on precomputed embedding tensors
  of the same shape, with its Adam step; 8 of them used in turn, so that, like real batches, they
  are not in the 32 MB L3 cache when a step starts);
- full step with 10M embedding rows / full step with 10k rows (same data, ids folded into the tables);
- `prepare` rows/s / pyarrow's plain CSV read rows/s of the same file.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ctrkit.config import Config
from ctrkit.data.loader import BatchLoader
from ctrkit.data.schema import Schema
from ctrkit.errors import CtrkitError
from ctrkit.models import build_model
from ctrkit.models.layers import fm_interaction
from ctrkit.ownership import OwnedFolder
from ctrkit.optim.build import build_optimizers
from ctrkit.train.ema import WeightEMA
from ctrkit.train.memory import keep_freed_memory


class _FoldedLoader(BatchLoader):
    """The same batches with ids folded into tables of `rows_per_table` rows.

    Folding happens in the loader's prefetch thread, before it finds the batch's distinct ids,
    exactly where real training does its id work, so the step measured is the real step.
    """

    def __init__(self, *args, rows_per_table: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows_per_table = rows_per_table

    def _gather(self, parts: List[tuple]) -> tuple:
        sparse, dense, labels = super()._gather(parts)
        return sparse % self.rows_per_table, dense, labels


def _schema_with_rows(schema: Schema, total_rows: int) -> Schema:
    s = copy.deepcopy(schema)
    per = max(2, total_rows // max(1, len(s.sparse)))
    for f in s.sparse:
        f.vocab_size = per
    return s


class _Variant:
    def __init__(self, name: str, step, loader_iter=None) -> None:
        self.name, self.step, self.it, self.times = name, step, loader_iter, []


def _full_variant(cfg: Config, schema: Schema, total_rows: Optional[int] = None,
                  device: torch.device = torch.device("cpu"), ema_decay: float = 0.0) -> _Variant:
    """The whole training step; tables of the data's own sizes, or `total_rows` rows in all;
    with `ema_decay` also the weight average's update (train.ema_decay)."""
    bs = cfg.train.batch_size
    pin = device.type == "cuda"
    if total_rows is None:
        s = schema
        loader = BatchLoader(schema, "train", bs, shuffle=True, seed=0, drop_last=True, prefetch=4,
                             pin_memory=pin)
    else:
        s = _schema_with_rows(schema, total_rows)
        loader = _FoldedLoader(schema, "train", bs, shuffle=True, seed=0, drop_last=True,
                               prefetch=4, rows_per_table=s.sparse[0].vocab_size, pin_memory=pin)
    torch.manual_seed(0)
    model = build_model(cfg.model, s).to(device)
    opts = build_optimizers(model, cfg.optimizer)
    ema = WeightEMA(model, ema_decay) if ema_decay else None
    state = {"it": iter(loader)}

    def step() -> None:
        try:
            batch = next(state["it"])
        except StopIteration:
            loader.set_position(loader.epoch + 1)
            state["it"] = iter(loader)
            batch = next(state["it"])
        batch = batch.to(device)
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
        loss.backward()
        if ema:
            ema.capture()
        for o in opts:
            o.step()
        if ema:
            ema.update()
        for o in opts:
            o.zero_grad(set_to_none=True)
    name = "full" if total_rows is None else f"full_{total_rows}_rows"
    return _Variant(name + ("_ema" if ema else ""), step)


DENSE_POOL = 8   # 8 x 7 MB of embeddings: more than this CPU's cache


def _dense_variant(cfg: Config, schema: Schema, batch_size: int, input_grad: bool = True,
                   device: torch.device = torch.device("cpu")) -> _Variant:
    """DeepFM's dense part alone on a precomputed embedding tensor of the same shape.

    With `input_grad` its backward also computes the gradient of its embedding input, as the dense
    part of any model with trained embeddings must (that GEMM is matrix work, not embedding
    overhead); without it, the number for a dense part on frozen embeddings is reported too."""
    torch.manual_seed(0)
    model = build_model(cfg.model, _schema_with_rows(schema, 10_000)).to(device)
    mlp = model.mlp
    n_fields, dim = len(schema.sparse), model.dim
    # Several precomputed batches used in turn: like real batches (and unlike one reused tensor)
    # they are not sitting in the CPU cache when a step starts.
    pool = [((torch.randn(batch_size, n_fields, dim, device=device) * 0.01).requires_grad_(input_grad),
             torch.randn(batch_size, len(schema.dense), device=device),
             (torch.rand(batch_size, device=device) < 0.25).float())
            for _ in range(DENSE_POOL)]
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3, fused=True)
    state = {"i": 0}

    def step() -> None:
        emb, dense, labels = pool[state["i"] % DENSE_POOL]
        state["i"] += 1
        logits = mlp(emb.reshape(batch_size, -1), dense).squeeze(1) + fm_interaction(emb)
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        emb.grad = None
    return _Variant("dense_only" if input_grad else "dense_only_frozen_input", step)


def measure_steps(cfg: Config, schema: Schema, threads: int, rounds: int, steps_per_round: int,
                  small_rows: int = 10_000, big_rows: int = 10_000_000,
                  device: torch.device = torch.device("cpu")) -> Dict[str, object]:
    torch.set_num_threads(threads)
    keep_freed_memory()   # as `ctrkit train` does
    bs = cfg.train.batch_size
    variants = [_dense_variant(cfg, schema, bs, device=device), _full_variant(cfg, schema, None, device),
                _full_variant(cfg, schema, small_rows, device),
                _full_variant(cfg, schema, big_rows, device),
                _dense_variant(cfg, schema, bs, input_grad=False, device=device),
                _full_variant(cfg, schema, None, device, ema_decay=cfg.train.ema_decay or 0.95)]

    def sync() -> None:   # a GPU step is timed to the end of its queued kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for v in variants:   # warm-up (allocations, lazy state)
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
    med = {v.name: statistics.median(v.times) for v in variants}
    ratios_dense = [a / b for a, b in zip(variants[1].times, variants[0].times)]
    ratios_big = [a / b for a, b in zip(variants[3].times, variants[2].times)]
    ratios_frozen = [a / b for a, b in zip(variants[1].times, variants[4].times)]
    ratios_ema = [a / b for a, b in zip(variants[5].times, variants[1].times)]
    return {
        "device": str(device), "threads": threads,
        "step_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
        "samples_per_s": {k: round(bs / v) for k, v in med.items()},
        "full_over_dense": round(statistics.median(ratios_dense), 3),
        "big_over_small_tables": round(statistics.median(ratios_big), 3),
        "full_over_dense_frozen_input": round(statistics.median(ratios_frozen), 3),
        # the step with train.ema_decay's weight average over the plain full step
        "full_ema_over_full": round(statistics.median(ratios_ema), 3),
        "rounds": rounds, "steps_per_round": steps_per_round,
    }


def measure_prepare(cfg: Config, out_dir: Path, rounds: int = 7) -> Dict[str, object]:
    """prepare (vocab + encode + write, train split only) vs pyarrow's plain CSV read, alternated."""

    import pyarrow.csv as pacsv

    from ctrkit.data.preprocess import prepare, split_files
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
        prepare(c, progress=False)
        t_prep.append(time.perf_counter() - t)
        OwnedFolder(pdir, "prepared folder").clear()   # (only what this prepare wrote)
    ratios = [a / b for a, b in zip(t_read, t_prep)]
    return {"file": str(path), "rows": rows,
            "pyarrow_read_rows_per_s": round(rows / statistics.median(t_read)),
            "prepare_rows_per_s": round(rows / statistics.median(t_prep)),
            "prepare_over_read": round(statistics.median(ratios), 3)}


def run_bench(what: str, cfg: Config, args) -> Dict[str, object]:
    if what == "compression":
        out = Path(args.out) if args.out else Path("bench/results/compression")
        out.mkdir(parents=True, exist_ok=True)
        workers = tuple(int(x) for x in os.environ.get("CTRKIT_BENCH_WORKERS", "4,8").split(","))
        settings = os.environ.get("CTRKIT_BENCH_COMPRESSORS", ",".join(COMPRESSION_SETTINGS))
        refs = tuple(os.environ.get("CTRKIT_BENCH_ALGOS", ",".join(COMPRESSION_REFERENCES)).split(","))
        return run_compression(cfg, out, workers=workers,
                               settings=tuple(s for s in settings.split(",") if s),
                               references=tuple(r for r in refs if r),
                               samples=int(float(os.environ.get("CTRKIT_BENCH_SAMPLES", "0"))))
    if what == "sharding":
        out = Path(args.out) if args.out else Path("bench/results/sharding")
        out.mkdir(parents=True, exist_ok=True)
        sizes = tuple(int(x) for x in os.environ.get("CTRKIT_BENCH_SHARDS", "1,2,4").split(","))
        return run_sharding(cfg, out, shard_sizes=sizes,
                            workers=int(os.environ.get("CTRKIT_BENCH_WORKERS", "4")),
                            samples=int(float(os.environ.get("CTRKIT_BENCH_SAMPLES", "0"))))
    if what != "throughput":
        raise CtrkitError(f"unknown benchmark '{what}'")
    from ctrkit.train.trainer import load_or_prepare
    if not cfg.data.train:
        raise CtrkitError("bench throughput needs a data config (e.g. configs/bench_throughput.yaml)")
    schema = load_or_prepare(cfg, progress=not args.quiet)
    out = Path(args.out) if args.out else Path("bench/out/throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rounds = int(os.environ.get("CTRKIT_BENCH_ROUNDS", "7"))
    steps = int(os.environ.get("CTRKIT_BENCH_STEPS", "3"))
    from ctrkit.train.device import resolve_device
    device = resolve_device(cfg.train.device)
    # On this 2-core host the CPU numbers at 1 and 2 threads; a GPU is measured once, with the
    # host's cores for the loader and the Python side.
    thread_counts = (1, 2) if device.type == "cpu" else (os.cpu_count() or 1,)
    result: Dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "batch_size": cfg.train.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": cfg.model.model_dump(), "sparse_optimizer": cfg.optimizer.sparse.name,
        "tables": len(schema.sparse), "vocabulary_rows": sum(f.vocab_size for f in schema.sparse),
        "train_rows": schema.splits["train"].rows_written,
        "steps": [measure_steps(cfg, schema, t, rounds, steps, device=device)
                  for t in thread_counts],
    }
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if device.type == "cpu":   # (host work: measured on the CPU runs only)
        result["prepare"] = measure_prepare(cfg, out.parent)
    else:
        result["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    out.write_text(json.dumps(result, indent=1))
    result["written_to"] = str(out)
    return result


# ------------------------------------------------------------------------- compression
COMPRESSION_REFERENCES = ("allreduce", "damsgrad", "dpsgd", "local")
COMPRESSION_SETTINGS = ("topk:0.01+int8@0.3", "topk:0.01+int8@0.6", "topk:0.03+int8@0.5")


def _bench_config(cfg: Config, run_dir: Path, algo: str, n: int, steps: int, dpsgd_lr: float,
                  **dist_over) -> Config:
    """One benchmark run's config: fixed steps, no early stop, no progress bar or plots."""
    c = cfg.model_copy(deep=True)
    if algo == "dpsgd":   # plain SGD: its own learning rate, unscaled
        c.optimizer.dense.lr = c.optimizer.sparse.lr = dpsgd_lr
        c.distributed.lr_scaling = "none"
    c.distributed.workers, c.distributed.algorithm = n, algo
    for k, v in dist_over.items():
        setattr(c.distributed, k, v)
    c.train.run_dir, c.train.overwrite, c.train.resume = str(run_dir), True, False
    c.train.max_steps = c.train.eval_every = c.train.checkpoint_every = steps
    c.train.early_stop.enabled = c.train.lr_plateau.enabled = False
    c.train.progress = c.train.tensorboard = c.train.plot = False
    return c


def _train_and_clean(c: Config, run_dir: Path) -> dict:
    """Train one benchmark run and return its metrics; its checkpoints are deleted afterwards.

    Why: every rank's resume state on the reference data is ~0.9 GB, so one 8-worker run leaves
    7 GB behind, and a sweep filled the disk (and then CI's install step failed). A benchmark
    needs the metrics, which stay in the run folder.
    """
    from ctrkit.train.trainer import train
    m = train(c).metrics
    OwnedFolder(run_dir, "run folder").clear(under="checkpoints")   # (only ctrkit's files)
    return m


def _run_one(cfg: Config, run_dir: Path, algo: str, n: int, steps: int, dpsgd_lr: float = 0.05,
             **dist_over) -> dict:
    c = _bench_config(cfg, run_dir, algo, n, steps, dpsgd_lr, **dist_over)
    t = time.time()
    m = _train_and_clean(c, run_dir)
    per_step = m.get("bytes_per_worker_step", 0.0)
    return {"algorithm": algo, "workers": n, "steps": steps, "samples": steps * n * c.train.batch_size,
            "final_auc": m["valid"]["auc"], "final_logloss": m["valid"]["logloss"],
            "auc_spread": m.get("auc_spread", 0.0),
            "lr_scale": m["lr_scale"],
            "consensus_embedding": m.get("consensus_embedding"), "consensus_dense": m.get("consensus_dense"),
            "bytes_per_worker_step": per_step, "total_bytes_per_worker": per_step * steps,
            "traffic": {k: v for k, v in m.items() if k.endswith("_per_step") or k == "compression_ratio"},
            "shard_group_size": m.get("shard_group_size", 1),
            "embedding_bytes_per_rank": m.get("embedding_bytes_per_rank"),
            "wall_s": round(time.time() - t, 1)}


def run_compression(cfg: Config, out: Path, workers=(4, 8), settings=COMPRESSION_SETTINGS,
                    references=COMPRESSION_REFERENCES, samples: int = 0) -> Dict[str, object]:
    """Final AUC/logloss against bytes sent: `choco` with each compressor setting
    (`spec@gamma`) and the reference algorithms, n workers on a ring, the same samples for all.

    Each n-worker run takes samples / (n x batch) steps (default: half an epoch of the data)."""
    from ctrkit.train.trainer import load_or_prepare
    schema = load_or_prepare(cfg, progress=False)
    rows = schema.splits["train"].rows_written
    bs = cfg.train.batch_size
    samples = samples or rows // 2
    runs = []
    for n in workers:
        steps = max(1, samples // (n * bs))
        plan = [(a, {}) for a in references]
        for spec in settings:
            comp, _, gamma = spec.partition("@")
            plan.append(("choco", {"compressor": comp, "gamma": float(gamma or cfg.distributed.gamma)}))
        for algo, over in plan:
            tag = algo if algo != "choco" else f"choco-{over['compressor']}-g{over['gamma']}"
            r = _run_one(cfg, Path(cfg.train.run_dir) / f"{tag.replace(':', '')}-n{n}", algo, n, steps,
                         **over)
            r.update(over)
            runs.append(r)
            partial = {"runs": runs, "partial": True}
            (out / "compression.json").write_text(json.dumps(partial, indent=1))   # survives a kill
            print(f"compression: n={n} {tag:32s} AUC {r['final_auc']:.4f} logloss "
                  f"{r['final_logloss']:.4f} {r['total_bytes_per_worker'] / 2**20:9.1f} MB/worker "
                  f"({r['wall_s']} s)", flush=True)
    for r in runs:
        ref = next((x for x in runs if x["algorithm"] == "damsgrad" and x["workers"] == r["workers"]), None)
        if ref and ref["total_bytes_per_worker"]:
            r["bytes_vs_damsgrad"] = r["total_bytes_per_worker"] / ref["total_bytes_per_worker"]
            r["auc_vs_damsgrad"] = r["final_auc"] - ref["final_auc"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "batch_per_worker": bs,
              "samples": samples, "topology": cfg.distributed.topology,
              "lr_scaling": cfg.distributed.lr_scaling, "dpsgd_lr": 0.05, "runs": runs}
    (out / "compression.json").write_text(json.dumps(result, indent=1))
    _plot_compression(result, out / "compression.png")
    return {k: v for k, v in result.items() if k != "runs"} | {
        "table": [{k: r.get(k) for k in ("algorithm", "compressor", "gamma", "workers", "final_auc",
                                         "total_bytes_per_worker", "bytes_vs_damsgrad")} for r in runs],
        "written_to": str(out / "compression.json")}


def _plot_compression(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = sorted({r["workers"] for r in result["runs"]})
    fig, axes = plt.subplots(1, len(ns), figsize=(6.5 * len(ns), 4.5), squeeze=False)
    for ax, n in zip(axes[0], ns):
        rs = [r for r in result["runs"] if r["workers"] == n]
        for r in rs:
            if r["algorithm"] == "choco":
                x = max(r["total_bytes_per_worker"], 1.0)
                ax.scatter([x], [r["final_auc"]])
                ax.annotate(f"{r['compressor']} g={r['gamma']}", (x, r["final_auc"]), fontsize=7)
        for algo, style in (("damsgrad", "--"), ("allreduce", "-"), ("dpsgd", ":"), ("local", "-.")):
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


# ---------------------------------------------------------------------------- sharding
def run_sharding(cfg: Config, out: Path, shard_sizes=(1, 2, 4), workers: int = 4,
                 samples: int = 0) -> Dict[str, object]:
    """The same n ranks as replicas (k = 1), as n/k shard groups of k ranks, and as one model-
    parallel group (k = n): final AUC of the averaged model against embedding bytes per rank,
    the same samples for every layout (default: half an epoch)."""
    from ctrkit.train.trainer import load_or_prepare
    schema = load_or_prepare(cfg, progress=False)
    rows = schema.splits["train"].rows_written
    bs = cfg.train.batch_size
    samples = samples or rows // 2
    steps = max(1, samples // (workers * bs))
    algo = cfg.distributed.algorithm
    runs = []
    for k in shard_sizes:
        r = _run_one(cfg, Path(cfg.train.run_dir) / f"{algo}-n{workers}-k{k}", algo, workers, steps,
                     shard_group_size=k)
        runs.append(r)
        (out / "sharding.json").write_text(json.dumps({"runs": runs, "partial": True}, indent=1))
        print(f"sharding: n={workers} k={k} AUC {r['final_auc']:.4f} logloss {r['final_logloss']:.4f} "
              f"embedding MB per rank {[round(b / 2**20, 1) for b in r['embedding_bytes_per_rank']]} "
              f"({r['wall_s']} s)", flush=True)
    base = next((r for r in runs if r["shard_group_size"] == 1), None)
    for r in runs:
        r["max_embedding_bytes_per_rank"] = max(r["embedding_bytes_per_rank"])
        if base:
            r["auc_vs_replicated"] = r["final_auc"] - base["final_auc"]
            r["memory_vs_replicated"] = (r["max_embedding_bytes_per_rank"]
                                         / base["max_embedding_bytes_per_rank"])
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows, "batch_per_rank": bs,
              "workers": workers, "samples": steps * workers * bs, "algorithm": algo,
              "topology": cfg.distributed.topology, "lr_scaling": cfg.distributed.lr_scaling,
              "runs": runs}
    (out / "sharding.json").write_text(json.dumps(result, indent=1))
    return {k: v for k, v in result.items() if k != "runs"} | {
        "table": [{k: r.get(k) for k in ("shard_group_size", "final_auc", "auc_vs_replicated",
                                         "max_embedding_bytes_per_rank", "memory_vs_replicated",
                                         "wall_s")} for r in runs],
        "written_to": str(out / "sharding.json")}
