#!/usr/bin/env python3
"""The scaling study (issue 15): samples to a target validation logloss with n workers.

    python bench/scaling.py CONFIG --out DIR [--workers 1,2,4,8] [--algorithms ...] [--lrs ...]

What is held fixed, for every n and every algorithm:
- the sample budget B: one epoch of the training split (or `--max-samples`), rounded down to a
  multiple of lcm(workers) x batch x evaluations, so every run takes whole steps and every run is
  evaluated at the same sample counts (B / evaluations apart, the last one at B);
- the per-worker batch (`--batch`): a run with n workers takes B / (n x batch) steps;
- the learning rate is the real one (`distributed.lr_scaling=none`): a grid (`--lrs`, dense and
  table lr alike) is tried for every (algorithm, n) with `--tune-seed`, the lr with the lowest
  final validation logloss is kept, and `--seeds` are run at that lr.

The validation file of the config is split once into two halves owned by the study (first half of
its lines: validation, used for the curves, the lr choice and the targets; second half: test, used
only for the final numbers). Linear speedup in this fixed-sample setting means the same number of
samples to a target at every n (n times fewer steps).

Each run is one `ctrkit.train` call (through `ctrkit.load_config(config, overrides)`); its result
is `DIR/runs/<algo>_n<n>_lr<lr>_s<seed>.json` (written atomically) and its run folder is removed
once read (only the files ctrkit recorded there). Finished runs are skipped by the next
invocation, failed ones too unless `--retry-failed`. At n = 1 damsgrad and choco have no
neighbours and are allreduce_amsgrad (AMSGrad on one worker): that run set is trained once and
stands for all three (`SAME_AT_N1`). `DIR/summary.json` and `DIR/scaling.png`
are rebuilt from the runs on disk at the end of every invocation (`--summarize-only`: only that).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import bench_args   # bench/: on sys.path when run as a program

# The four algorithms of the study and the config overrides that select them.
ALGORITHMS: Dict[str, List[str]] = {
    "damsgrad": ["distributed.algorithm=damsgrad"],
    "choco": ["distributed.algorithm=choco"],
    # allreduce with damsgrad's own base optimizer (AMSGrad, no bias correction)
    "allreduce_amsgrad": ["distributed.algorithm=allreduce", "distributed.base_optimizer=amsgrad"],
    # allreduce with the config's optimizers (Adam in bench/configs/scaling.yaml)
    "allreduce_adam": ["distributed.algorithm=allreduce"],
}
# At n = 1 a worker has no neighbours: damsgrad and choco are AMSGrad without bias correction on
# one worker, i.e. allreduce_amsgrad at n = 1 (damsgrad bit for bit, tests/test_amsgrad_baseline.py;
# choco's x_hat moves but never x, and its tracker floor max(u, vhat) differs from u only by
# rounding). Their n = 1 cells are that one run set, trained once.
SAME_AT_N1 = {"damsgrad": "allreduce_amsgrad", "choco": "allreduce_amsgrad"}
CRITERION = 1.15          # samples to target at n = 8 at most 15 % above n = 1
STUDY_KIND = "scaling study folder"
STUDY_FILES = ["study.json", "summary.json", "scaling.png", "data/valid.tsv", "data/test.tsv"]
RUN_KINDS = ("tune", "seed")


# ------------------------------------------------------------------------------ arguments
def _algorithms(text: str) -> List[str]:
    names = bench_args.comma_list(str, "--algorithms")(text)
    bad = [a for a in names if a not in ALGORITHMS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown algorithm {bad[0]!r} (known: "
                                         f"{', '.join(ALGORITHMS)})")
    return list(dict.fromkeys(names))


def _override(text: str) -> str:
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"--set takes key=value, not {text!r}")
    return text


def _nonneg(text: str) -> int:
    v = int(float(text))
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return v


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/scaling.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", type=Path, help="ctrkit YAML config (data, model, optimizer)")
    p.add_argument("--out", type=Path, required=True, help="study folder (runs, summary, plot)")
    p.add_argument("--algorithms", type=_algorithms, default=list(ALGORITHMS),
                   help=f"comma-separated, of {', '.join(ALGORITHMS)}")
    p.add_argument("--workers", type=bench_args.comma_list(int, "--workers"), default=[1, 2, 4, 8],
                   help="numbers of workers n (must include 1, the baseline)")
    p.add_argument("--only", type=bench_args.comma_list(int, "--only"), default=None,
                   help="train only these n now (of --workers, which still sets the budget); "
                        "the other n's runs on disk are summarized as usual")
    p.add_argument("--lrs", type=bench_args.comma_list(float, "--lrs"), default=[5e-4, 1e-3, 2e-3, 4e-3],
                   help="learning-rate grid (dense and table lr alike, not scaled with n)")
    p.add_argument("--seeds", type=bench_args.comma_list(int, "--seeds"), default=[0, 1, 2],
                   help="seeds run at each (algorithm, n)'s chosen lr")
    p.add_argument("--tune-seed", type=_nonneg, default=0, help="seed of the lr-grid runs")
    p.add_argument("--batch", type=_positive, default=None,
                   help="per-worker batch (default: the config's train.batch_size)")
    p.add_argument("--max-samples", type=_nonneg, default=0,
                   help="cap the sample budget (0: one epoch of the training split)")
    p.add_argument("--evals", type=_positive, default=10,
                   help="evaluations per run (about; the budget is rounded to whole intervals)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads per rank")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="KEY=VALUE", help="extra config override for every run (repeatable)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--summarize-only", action="store_true",
                   help="only rebuild summary.json and scaling.png from the runs on disk")
    return p


# ------------------------------------------------------------------------------ statistics
def samples_to(curve: Sequence[dict], target: float) -> Optional[float]:
    """Samples at which the validation logloss first reaches `target`, interpolated linearly
    between the two evaluations around the crossing; None if it never does. A curve already at
    the target at its first evaluation gives that evaluation's samples (an upper bound: see
    `left_censored`)."""
    prev = None
    for c in curve:
        if c["logloss"] <= target:
            if prev is None or prev["logloss"] == c["logloss"]:
                return float(c["samples"])
            frac = (prev["logloss"] - target) / (prev["logloss"] - c["logloss"])
            return prev["samples"] + frac * (c["samples"] - prev["samples"])
        prev = c
    return None


def left_censored(curve: Sequence[dict], target: float) -> bool:
    """The run was at the target already at its first evaluation (its crossing is earlier)."""
    return bool(curve) and curve[0]["logloss"] <= target


def _t_quantile(df: float, level: float = 0.95) -> float:
    from scipy.stats import t
    return float(t.ppf(0.5 + level / 2, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, sample standard deviation and the t-distribution confidence interval of the mean
    over seeds (lo/hi None with fewer than two values)."""
    vals = [float(v) for v in values]
    k = len(vals)
    if k == 0:
        return {"n": 0, "mean": None, "sd": None, "lo": None, "hi": None}
    mean = statistics.fmean(vals)
    if k < 2:
        return {"n": 1, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = statistics.stdev(vals)
    half = _t_quantile(k - 1, level) * sd / math.sqrt(k)
    return {"n": k, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def ratio_interval(num: Sequence[float], den: Sequence[float], level: float = 0.95) -> dict:
    """mean(num) / mean(den) with a confidence interval for independent samples: delta method on
    the log of the ratio, Welch-Satterthwaite degrees of freedom (None with < 2 values each)."""
    if not num or not den:
        return {"ratio": None, "lo": None, "hi": None, "df": None}
    a, b = statistics.fmean(num), statistics.fmean(den)
    if a <= 0 or b <= 0:
        return {"ratio": None, "lo": None, "hi": None, "df": None}
    r = a / b
    if len(num) < 2 or len(den) < 2:
        return {"ratio": r, "lo": None, "hi": None, "df": None}
    va = statistics.variance(num) / (len(num) * a * a)
    vb = statistics.variance(den) / (len(den) * b * b)
    var = va + vb
    if var == 0:
        return {"ratio": r, "lo": r, "hi": r, "df": None}
    df = var ** 2 / (va ** 2 / (len(num) - 1) + vb ** 2 / (len(den) - 1))
    half = _t_quantile(df, level) * math.sqrt(var)
    return {"ratio": r, "lo": r * math.exp(-half), "hi": r * math.exp(half), "df": df}


def verdict(ratio: dict, limit: float = CRITERION) -> str:
    """`meets` (the interval lies at or below `limit`), `fails` (above it), `inconclusive`
    (straddles it), or `not reached` / `point estimate only`."""
    if ratio.get("ratio") is None:
        return "not reached"
    if ratio.get("hi") is None:
        return "point estimate only: " + ("at or below" if ratio["ratio"] <= limit else "above")
    if ratio["hi"] <= limit:
        return "meets"
    if ratio["lo"] > limit:
        return "fails"
    return "inconclusive"


# ------------------------------------------------------------------------------ budget
def plan_budget(rows: int, shards: int, workers: Sequence[int], batch: int, evals: int,
                max_samples: int = 0) -> dict:
    """The sample budget B and the evaluation interval (both the same for every n).

    Every rank must take B / (n x batch) full batches from its slice of the epoch (a rank's slice
    of each shard is at least floor(shard rows / n), so at least rows // n - shards rows), and
    every n must evaluate at the same sample counts: the interval is m x lcm(n) x batch and B is
    k intervals, with k about `evals` (0.7x to 1.5x) and k x m as large as the epoch allows."""
    lcm = 1
    for n in workers:
        lcm = lcm * n // math.gcd(lcm, n)
    cap = min([rows] + [max_samples] * bool(max_samples)
              + [n * (rows // n - shards) for n in workers])
    unit = lcm * batch
    units = cap // unit
    if units < 1:
        raise SystemExit(f"scaling: the budget ({cap} samples) is below one step of every worker "
                         f"count at once (lcm({','.join(map(str, workers))}) x batch {batch} = "
                         f"{unit}); raise --max-samples or lower --batch")
    lo, hi = max(1, math.ceil(0.7 * evals)), max(1, math.floor(1.5 * evals))
    best = None
    for k in range(min(lo, units), min(hi, units) + 1):
        m = units // k
        key = (k * m, -abs(k - evals))
        if best is None or key > best[0]:
            best = (key, k, m)
    _, k, m = best
    interval = m * unit
    return {"epoch_rows": rows, "max_samples": max_samples, "lcm_workers": lcm,
            "budget_samples": k * interval, "eval_interval_samples": interval, "evals": k,
            "fraction_of_epoch": k * interval / rows}


def steps_for(budget: dict, n: int, batch: int) -> Tuple[int, int]:
    """(steps, eval_every) of a run with n workers."""
    return budget["budget_samples"] // (n * batch), budget["eval_interval_samples"] // (n * batch)


# ------------------------------------------------------------------------------ files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clean(obj):
    """JSON-safe: NaN and infinities (e.g. the AUC of a split with one class) become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_json(path: Path, data: dict) -> None:
    from ctrkit.ownership import atomic_write_text
    atomic_write_text(path, json.dumps(_clean(data), indent=1, default=str, allow_nan=False))


def _read_json(path: Path) -> Optional[dict]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def split_valid(source: Path, out_dir: Path, header: bool) -> dict:
    """Write the first half of `source`'s (non-blank) lines to out_dir/valid.tsv and the second
    half to out_dir/test.tsv (a header line goes to both), atomically; returns what was done."""
    from ctrkit.ownership import atomic_path
    with open(source, "rb") as f:
        lines = [ln if ln.endswith(b"\n") else ln + b"\n" for ln in f if ln.strip()]
    head, body = (lines[:1], lines[1:]) if header else ([], lines)
    half = len(body) // 2
    if half == 0 or len(body) - half == 0:
        raise SystemExit(f"scaling: {source} has {len(body)} rows; cannot split it into a "
                         "validation and a test half")
    out = {}
    for name, part in (("valid", body[:half]), ("test", body[half:])):
        path = out_dir / f"{name}.tsv"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.writelines(head + part)
        out[name] = {"path": str(path), "rows": len(part), "sha256": _sha256(path)}
    return {"source": str(source), "source_sha256": _sha256(source), "source_rows": len(body),
            "header": header, "rule": "first half of the source's rows: valid; second half: test",
            **out}


# ------------------------------------------------------------------------------ one run
def run_name(algo: str, n: int, lr: float, seed: int) -> str:
    return f"{algo}_n{n}_lr{lr:g}_s{seed}"


def read_curve(run_dir: Path, n: int, batch: int) -> List[dict]:
    """The validation evaluations of a run (metrics.csv): samples seen by all workers, the
    averaged model's logloss/AUC, and the per-worker figures logged with them."""
    out = []
    with open(run_dir / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r.get("split") != "valid":
                continue
            c = {"step": int(r["step"]), "samples": int(r["step"]) * n * batch,
                 "logloss": float(r["logloss"]), "auc": float(r["auc"])}
            for k in ("auc_min", "auc_spread", "consensus_embedding", "consensus_dense",
                      "bytes_per_worker_step"):
                if r.get(k) not in (None, ""):
                    c[k] = float(r[k])
            out.append(c)
    return out


def remove_run_folder(run_dir: Path) -> Optional[str]:
    """Remove what ctrkit recorded in a run folder (bench_args.remove_owned_folder)."""
    from ctrkit.train.run_dir import RUN
    return bench_args.remove_owned_folder(run_dir, RUN)


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "ctrkit"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty(ctrkit/)" if dirty else "")) if head else None


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = args.out.resolve()
        self.runs_dir = self.out / "runs"
        self.work = self.out / "work"
        self.base_overrides: List[str] = []
        self.budget: dict = {}
        self.batch = 0
        self.git = _git_commit()
        self.counts = {"ran": 0, "skipped": 0, "failed": 0}

    def run_overrides(self, algo: str, n: int, lr: float, seed: int) -> List[str]:
        steps, every = steps_for(self.budget, n, self.batch)
        return [*self.base_overrides, *ALGORITHMS[algo],
                f"distributed.workers={n}", "distributed.lr_scaling=none",
                f"optimizer.dense.lr={lr!r}", f"optimizer.sparse.lr={lr!r}",
                f"train.seed={seed}", f"train.max_steps={steps}", f"train.eval_every={every}",
                f"train.checkpoint_every={steps}", "train.epochs=1",
                f"train.run_dir={self.work / run_name(algo, n, lr, seed)}"]

    def run(self, algo: str, n: int, lr: float, seed: int, kind: str) -> Optional[dict]:
        """One run's record: read from disk when it is there, else trained now."""
        import ctrkit
        from ctrkit.errors import Interrupted
        name = run_name(algo, n, lr, seed)
        path = self.runs_dir / f"{name}.json"
        what = f"{algo} n={n} lr={lr:g} seed={seed} ({kind})"
        old = _read_json(path) if path.is_file() else None
        if old and old.get("status") == "ok":
            self.counts["skipped"] += 1
            print(f"scaling: {what}: skipped, done earlier (final valid logloss "
                  f"{old['final_valid_logloss']:.4f})", flush=True)
            return old
        if old and old.get("status") == "failed" and not self.args.retry_failed:
            self.counts["skipped"] += 1
            print(f"scaling: {what}: skipped, failed earlier ({old.get('error', '?')[:160]}; "
                  "--retry-failed runs it again)", flush=True)
            return old
        steps, every = steps_for(self.budget, n, self.batch)
        overrides = self.run_overrides(algo, n, lr, seed)
        run_dir = self.work / name
        rec = {"name": name, "algorithm": algo, "workers": n, "lr": lr, "seed": seed,
               "kind": kind, "batch_per_worker": self.batch, "steps": steps, "eval_every": every,
               "budget_samples": self.budget["budget_samples"], "overrides": overrides,
               "git": self.git, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        t0 = time.time()
        try:
            cfg = ctrkit.load_config(str(self.args.config), overrides)
            metrics = ctrkit.train(cfg, progress=False).metrics
            rec.update(self._result(metrics, read_curve(run_dir, n, self.batch), steps))
        except (KeyboardInterrupt, Interrupted):
            remove_run_folder(run_dir)
            raise
        except Exception as e:   # a failed run is a result, recorded and not retried
            rec.update(status="failed", error=f"{type(e).__name__}: {e}".strip(),
                       traceback=traceback.format_exc(limit=6)[-3000:])
        rec["wall_s"] = round(time.time() - t0, 1)
        with contextlib.suppress(Exception):
            note = remove_run_folder(run_dir)
            if note:
                rec["run_folder_note"] = note
        gc.collect()
        _write_json(path, rec)
        if rec["status"] == "ok":
            self.counts["ran"] += 1
            print(f"scaling: {what}: {rec['wall_s']:.1f} s ({steps} steps), final valid logloss "
                  f"{rec['final_valid_logloss']:.4f} AUC {rec['final_valid_auc']:.4f}", flush=True)
        else:
            self.counts["failed"] += 1
            print(f"scaling: {what}: FAILED after {rec['wall_s']:.1f} s: {rec['error'][:300]}",
                  flush=True)
        return rec

    def _result(self, metrics: dict, curve: List[dict], steps: int) -> dict:
        problems = []
        if metrics.get("steps") != steps:
            problems.append(f"ran {metrics.get('steps')} steps, planned {steps}")
        if metrics.get("samples") != self.budget["budget_samples"]:
            problems.append(f"saw {metrics.get('samples')} samples, planned "
                            f"{self.budget['budget_samples']}")
        if not curve or curve[-1]["samples"] != self.budget["budget_samples"]:
            problems.append("no validation evaluation at the end of the budget")
        if problems:
            return {"status": "failed", "error": "; ".join(problems), "metrics": metrics,
                    "curve": curve}
        last = curve[-1]
        key = "wire_bytes_per_step" if "wire_bytes_per_step" in metrics else \
            ("bytes_per_worker_step" if "bytes_per_worker_step" in metrics else None)
        worst = {k: metrics[k] for k in ("auc_min", "auc_spread", "consensus_embedding",
                                         "consensus_dense") if k in metrics}
        return {"status": "ok", "curve": curve,
                "final_valid_logloss": last["logloss"], "final_valid_auc": last["auc"],
                "test": metrics.get("test"), "selected_valid": metrics.get("valid"),
                "best_step": metrics.get("best_step"),
                "worst_worker": worst or None,
                "bytes_per_step": metrics.get(key) if key else None, "bytes_key": key,
                "train_seconds": metrics.get("wall_seconds"),
                "samples_per_s": metrics.get("samples_per_s"), "metrics": metrics}


# ------------------------------------------------------------------------------ summary
def trained_as(algo: str, n: int) -> str:
    """The algorithm whose runs stand for `algo` at n workers (SAME_AT_N1)."""
    return SAME_AT_N1.get(algo, algo) if n == 1 else algo


def with_shared_n1(runs: List[dict], algorithms: Optional[Sequence[str]] = None) -> List[dict]:
    """The runs, plus a copy of every n = 1 run of a SAME_AT_N1 target under each algorithm it
    stands for (of `algorithms`, default all; `shared_from` names the run)."""
    out = [r for r in runs if not (r["workers"] == 1 and r["algorithm"] in SAME_AT_N1)]
    for r in list(out):
        if r["workers"] == 1:
            out += [dict(r, algorithm=a, shared_from=r["name"])
                    for a, target in SAME_AT_N1.items()
                    if target == r["algorithm"] and (algorithms is None or a in algorithms)]
    return out


def load_runs(runs_dir: Path) -> List[dict]:
    out = []
    for p in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
        d = _read_json(p)
        if d and "algorithm" in d:
            out.append(d)
    return out


def choose_lr(runs: Iterable[dict], algo: str, n: int, tune_seed: int) -> dict:
    """The lr of the (algorithm, n) tuning run (seed `tune_seed`) with the lowest final
    validation logloss; failed lrs are listed, an lr at either end of the grid tried is flagged."""
    tried = {}
    for r in runs:
        if r["algorithm"] == algo and r["workers"] == n and r["seed"] == tune_seed:
            tried[r["lr"]] = r
    ok = {lr: r for lr, r in tried.items() if r.get("status") == "ok"}
    out = {"tried": {f"{lr:g}": (round(r["final_valid_logloss"], 6) if r.get("status") == "ok"
                                 else "failed: " + str(r.get("error", ""))[:200])
                     for lr, r in sorted(tried.items())}, "lr": None, "at_grid_edge": None}
    if ok:
        lr = min(ok, key=lambda x: ok[x]["final_valid_logloss"])
        grid = sorted(tried)
        out.update(lr=lr, at_grid_edge=len(grid) > 1 and lr in (grid[0], grid[-1]))
    return out


def _mean_curve(curves: List[List[dict]]) -> List[dict]:
    by: Dict[int, List[dict]] = {}
    for c in curves:
        for p in c:
            by.setdefault(p["samples"], []).append(p)
    out = []
    for s in sorted(by):
        ps = by[s]
        if len(ps) != len(curves):   # (every seed at the same sample counts)
            continue
        ll, auc = [p["logloss"] for p in ps], [p["auc"] for p in ps]
        out.append({"samples": s, "logloss": statistics.fmean(ll), "logloss_min": min(ll),
                    "logloss_max": max(ll), "auc": statistics.fmean(auc), "auc_min": min(auc),
                    "auc_max": max(auc)})
    return out


def _stat(values: Sequence[Optional[float]]) -> Optional[dict]:
    vals = [v for v in values if v is not None]
    return t_interval(vals) if vals else None


def summarize(runs: List[dict], settings: dict) -> dict:
    """Everything the study reports, from the run records on disk."""
    runs = with_shared_n1(runs, settings.get("algorithms"))
    tune_seed = settings.get("tune_seed", 0)
    seeds_wanted = settings.get("seeds", [])
    algos = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in runs)]
    ns = sorted({r["workers"] for r in runs})
    cells: Dict[str, Dict[str, dict]] = {}
    for a in algos:
        for n in ns:
            if not any(r["algorithm"] == a and r["workers"] == n for r in runs):
                continue
            choice = choose_lr(runs, a, n, tune_seed)
            cell = {"lr": choice, "seeds": [], "failed_seeds": []}
            if choice["lr"] is not None:
                for r in runs:
                    if r["algorithm"] == a and r["workers"] == n and r["lr"] == choice["lr"] \
                            and (r["seed"] in seeds_wanted or not seeds_wanted):
                        (cell["seeds"] if r.get("status") == "ok" else cell["failed_seeds"]).append(r)
                cell["seeds"].sort(key=lambda r: r["seed"])
            cells.setdefault(a, {})[str(n)] = cell

    # Targets, from the n = 1 runs of the algorithm with the lowest mean final logloss there.
    n1 = {a: cells[a]["1"]["seeds"] for a in cells if "1" in cells[a] and cells[a]["1"]["seeds"]}
    targets: List[dict] = []
    best_algo = None
    if n1:
        best_algo = min(n1, key=lambda a: statistics.fmean(r["final_valid_logloss"] for r in n1[a]))
        finals = [r["final_valid_logloss"] for r in n1[best_algo]]
        start = statistics.fmean(r["curve"][0]["logloss"] for r in n1[best_algo])
        hard = max(finals)
        for name, frac in (("easy", 1 / 3), ("medium", 2 / 3)):
            targets.append({"name": name, "logloss": start + frac * (hard - start),
                            "defined_as": f"{frac:.2f} of the way from the mean first-evaluation "
                                          f"logloss ({start:.5f}) of {best_algo} n=1 to the hard "
                                          "target"})
        targets.append({"name": "hard", "logloss": hard,
                        "defined_as": f"the worst final validation logloss over the seeds of "
                                      f"{best_algo} n=1 (the best algorithm at n=1: lowest mean "
                                      "final logloss), so every seed of it reaches it"})

    results: Dict[str, Dict[str, dict]] = {}
    for a, by_n in cells.items():
        for n, cell in by_n.items():
            rs = cell["seeds"]
            res = {"lr": cell["lr"]["lr"], "lr_at_grid_edge": cell["lr"]["at_grid_edge"],
                   "lr_tuning": cell["lr"]["tried"], "seeds": [r["seed"] for r in rs],
                   "failed_seeds": [{"seed": r["seed"], "error": r.get("error")}
                                    for r in cell["failed_seeds"]]}
            if rs:
                res.update(
                    steps=rs[0]["steps"],
                    final_valid_logloss=_stat([r["final_valid_logloss"] for r in rs]),
                    final_valid_auc=_stat([r["final_valid_auc"] for r in rs]),
                    test_auc=_stat([(r.get("test") or {}).get("auc") for r in rs]),
                    test_logloss=_stat([(r.get("test") or {}).get("logloss") for r in rs]),
                    test_is_last_model=f"{sum(r.get('best_step') == r['steps'] for r in rs)}"
                                       f"/{len(rs)}",
                    wall_s=_stat([r.get("wall_s") for r in rs]),
                    samples_per_s=_stat([r.get("samples_per_s") for r in rs]))
                worst = [r.get("worst_worker") or {} for r in rs]
                if any(worst):
                    res["worst_worker"] = {
                        "worker_auc_min": _stat([w.get("auc_min") for w in worst]),
                        "averaged_model_auc": res["final_valid_auc"],
                        "auc_spread": _stat([w.get("auc_spread") for w in worst]),
                        "consensus_embedding": _stat([w.get("consensus_embedding") for w in worst]),
                        "consensus_dense": _stat([w.get("consensus_dense") for w in worst])}
                keys = sorted({r.get("bytes_key") for r in rs if r.get("bytes_key")})
                res["bytes_per_worker_step"] = _stat([r.get("bytes_per_step") for r in rs])
                res["bytes_key"] = ",".join(keys) or None
                res["samples_to_target"] = {}
                for t in targets:
                    per = [samples_to(r["curve"], t["logloss"]) for r in rs]
                    reached = [p for p in per if p is not None]
                    st = {"per_seed": per, "reached": f"{len(reached)}/{len(per)}",
                          "left_censored": sum(left_censored(r["curve"], t["logloss"]) for r in rs)}
                    st.update(t_interval(per) if len(reached) == len(per) else
                              {"n": len(per), "mean": None, "sd": None, "lo": None, "hi": None})
                    res["samples_to_target"][t["name"]] = st
                res["curve"] = _mean_curve([r["curve"] for r in rs])
            results.setdefault(a, {})[n] = res

    # Samples at n over samples at n = 1 of the same algorithm (1.0: linear speedup).
    n_max = max((int(n) for a in results for n in results[a]), default=1)
    n_check = 8 if any("8" in results[a] for a in results) else n_max
    criterion = []
    for a, by_n in results.items():
        base = by_n.get("1", {}).get("samples_to_target", {})
        for n, res in by_n.items():
            if "samples_to_target" not in res:
                continue
            res["ratio_to_n1"] = {}
            for t in targets:
                mine, one = res["samples_to_target"][t["name"]], base.get(t["name"])
                ok = one and one["mean"] is not None and mine["mean"] is not None
                ratio = ratio_interval(mine["per_seed"], one["per_seed"]) if ok else \
                    {"ratio": None, "lo": None, "hi": None, "df": None}
                ratio["steps_speedup"] = int(n) / ratio["ratio"] if ratio["ratio"] else None
                ratio["verdict"] = verdict(ratio)
                res["ratio_to_n1"][t["name"]] = ratio
                if int(n) == n_check and n_check > 1:
                    criterion.append({"algorithm": a, "workers": int(n), "target": t["name"],
                                      **{k: ratio[k] for k in ("ratio", "lo", "hi", "verdict")}})
    return {
        "what": "samples to a target validation logloss with n workers, the same sample budget "
                "and per-worker batch for every n; lr tuned per (algorithm, n) on validation",
        "settings": settings,
        "best_algorithm_at_n1": best_algo, "targets": targets,
        "criterion": {"rule": f"samples to target at n={n_check if n_check > 1 else 8} / at "
                              f"n=1 <= {CRITERION} (ratio of mean samples over seeds; 95 % "
                              "interval: delta method on the log ratio, Welch df; 'meets' when "
                              "the whole interval is <= the limit, 'fails' when it is above)",
                      "workers": n_check if n_check > 1 else None, "checks": criterion},
        "statistics": "mean over seeds; 95 % confidence intervals from the t-distribution with "
                      "seeds - 1 degrees of freedom; samples to target interpolated linearly "
                      "between evaluations (None when a seed never reaches it: then no mean)",
        "test_metrics": "of the checkpoint with the lowest validation logloss (trainer's best; "
                        "test_is_last_model says how often that was the end of the budget)",
        "worst_worker": "auc_min: the lowest AUC of any worker's own model on the validation half "
                        "at the last evaluation (ctrkit logs no per-worker logloss); "
                        "consensus: mean squared distance of the workers to their average",
        "results": results,
        "runs": [{k: r.get(k) for k in ("name", "status", "algorithm", "workers", "lr", "seed",
                                         "kind", "wall_s", "final_valid_logloss", "error")}
                 for r in runs],
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ctrkit.ownership import atomic_path
    results = summary["results"]
    algos = [a for a in results if any("curve" in r for r in results[a].values())]
    fig, axes = plt.subplots(2, max(1, len(algos)), figsize=(5.2 * max(1, len(algos)), 8),
                             squeeze=False)
    if not algos:
        axes[0][0].text(0.5, 0.5, "no finished runs yet", ha="center", va="center")
    for j, a in enumerate(algos):
        for n in sorted(results[a], key=int):
            res = results[a][n]
            c = res.get("curve")
            if not c:
                continue
            xs = [p["samples"] for p in c]
            label = f"n={n} (lr {res['lr']:g}, {len(res['seeds'])} seed(s))"
            for i, key in enumerate(("logloss", "auc")):
                line, = axes[i][j].plot(xs, [p[key] for p in c], marker="o", ms=3, label=label)
                axes[i][j].fill_between(xs, [p[f"{key}_min"] for p in c],
                                        [p[f"{key}_max"] for p in c], color=line.get_color(),
                                        alpha=0.2, lw=0)
        for t in summary["targets"]:
            axes[0][j].axhline(t["logloss"], color="grey", lw=0.8, ls="--")
        axes[0][j].set_title(a)
        for i, ylab in enumerate(("validation logloss (averaged model)", "validation AUC")):
            axes[i][j].set_xlabel("samples seen (all workers)")
            axes[i][j].set_ylabel(ylab)
            axes[i][j].grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.suptitle("mean over seeds, band: min..max; dashed: targets", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _fmt(st: Optional[dict], scale: float = 1.0, digits: int = 4) -> str:
    if not st or st.get("mean") is None:
        return "-"
    s = f"{st['mean'] / scale:.{digits}f}"
    if st.get("lo") is not None:
        s += f" [{st['lo'] / scale:.{digits}f}, {st['hi'] / scale:.{digits}f}]"
    return s


def print_table(summary: dict) -> None:
    targets = [t["name"] for t in summary["targets"]]
    print("scaling: targets " + ", ".join(f"{t['name']} {t['logloss']:.4f}"
                                          for t in summary["targets"]), flush=True)
    for a, by_n in summary["results"].items():
        for n in sorted(by_n, key=int):
            r = by_n[n]
            if "final_valid_logloss" not in r:
                print(f"scaling: {a} n={n}: no finished seed (lr {r['lr']})", flush=True)
                continue
            hard = targets[-1] if targets else None
            st = r["samples_to_target"].get(hard) if hard else None
            ratio = r.get("ratio_to_n1", {}).get(hard, {}) if hard else {}
            print(f"scaling: {a:17s} n={n:>2} lr {r['lr']:<7g} seeds {len(r['seeds'])} "
                  f"valid logloss {_fmt(r['final_valid_logloss'])}  test AUC {_fmt(r['test_auc'])}"
                  f"  samples to {hard}: "
                  + (f"{_fmt(st, 1e3, 1)}k" if st and st["mean"] is not None else "no mean")
                  + f" (reached {st['reached'] if st else '-'})"
                  + (f" ratio {ratio['ratio']:.3f} {ratio['verdict']}" if ratio.get("ratio")
                     else ""), flush=True)


# ------------------------------------------------------------------------------ settings
def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def settings_conflict(old: dict, new: dict) -> Optional[str]:
    """The first setting that affects results and differs between two invocations (keys only one
    of them has, e.g. a config key added to ctrkit since, are not compared)."""
    a, b = _flatten(old.get("fixed", {})), _flatten(new.get("fixed", {}))
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            return f"{k} was {a[k]!r}, is {b[k]!r} now"
    return None


# Keys of the config that every run sets itself.
_PER_RUN = ("train.run_dir", "train.seed", "train.max_steps", "train.eval_every",
            "train.checkpoint_every", "train.threads", "distributed.workers",
            "distributed.algorithm", "optimizer.dense.lr", "optimizer.sparse.lr")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if 1 not in args.workers:
        print("scaling: --workers must include 1 (the baseline)", file=sys.stderr)
        return 2
    args.workers = sorted(set(args.workers))
    if args.only and not set(args.only) <= set(args.workers):
        print(f"scaling: --only {','.join(map(str, args.only))} is not a subset of --workers "
              f"{','.join(map(str, args.workers))}", file=sys.stderr)
        return 2
    from ctrkit.errors import CtrkitError
    from ctrkit.ownership import OwnedFolder
    study = Study(args)
    out = study.out
    folder = OwnedFolder(out, STUDY_KIND)
    try:
        if out.exists() and not out.is_dir():
            raise CtrkitError(f"--out {out} is a file")
        if args.summarize_only and not (out / "study.json").is_file():
            raise CtrkitError(f"{out / 'study.json'} not found: no study was run in {out}")
        if out.is_dir() and any(out.iterdir()) and not folder.owned:
            raise CtrkitError(f"--out {out} is not empty and is not a scaling study folder; "
                              "choose another folder")
        folder.record(files=STUDY_FILES, patterns=["runs/*.json"], dirs=["runs", "data", "work"])
        with folder.lock(exclusive=True, wait=False):
            return _main(study, args)
    except CtrkitError as e:
        print(f"scaling: error: {e}", file=sys.stderr)
        return 2


def _main(study: Study, args: argparse.Namespace) -> int:
    out = study.out
    study_json = out / "study.json"
    if args.summarize_only:
        _finish(study, _read_json(study_json) or {})
        return 0

    import ctrkit
    from ctrkit.data.formats import resolve_layout
    raw = ctrkit.load_config(str(args.config), args.overrides)
    if not raw.data.valid or not raw.data.train:
        print("scaling: the config needs data.train and data.valid (valid is split into the "
              "study's validation and test halves)", file=sys.stderr)
        return 2
    source = Path(raw.data.valid)
    saved = _read_json(study_json) or {}
    split = saved.get("splits")
    data_dir = out / "data"
    if not (split and split.get("source") == str(source) and all(
            Path(split[s]["path"]).is_file() and _sha256(Path(split[s]["path"])) ==
            split[s]["sha256"] for s in ("valid", "test"))):
        if split and split.get("source") != str(source):
            print(f"scaling: {out} was made from validation file {split.get('source')}, the "
                  f"config now names {source}; use another --out", file=sys.stderr)
            return 2
        split = split_valid(source, data_dir, resolve_layout(raw.data, source).header)
        print(f"scaling: split {source} ({split['source_rows']} rows) into "
              f"{split['valid']['path']} ({split['valid']['rows']}) and {split['test']['path']} "
              f"({split['test']['rows']})", flush=True)
    study.batch = args.batch or raw.train.batch_size
    study.base_overrides = [
        *args.overrides, f"data.valid={split['valid']['path']}", f"data.test={split['test']['path']}",
        f"data.prepared_dir={out / 'prepared'}", f"train.batch_size={study.batch}",
        f"train.threads={args.threads}", "train.progress=false", "train.tensorboard=false",
        "train.plot=false", "train.overwrite=true", "train.resume=false",
        "train.early_stop.enabled=false", "train.early_stop.monitor=valid_logloss",
        "train.lr_plateau.enabled=false", "train.ema_decay=0"]
    base = ctrkit.load_config(str(args.config), study.base_overrides)
    if base.optimizer.schedule.name != "constant" or base.optimizer.schedule.warmup_steps:
        print("scaling: the config has an lr schedule; the study compares constant learning "
              "rates (optimizer.schedule.name=constant)", file=sys.stderr)
        return 2
    t0 = time.time()
    schema = ctrkit.prepare(base, progress=False)
    train_split = schema.splits["train"]
    print(f"scaling: prepared data in {out / 'prepared'} ({train_split.rows_written} training "
          f"rows; {time.time() - t0:.1f} s)", flush=True)
    study.budget = plan_budget(train_split.rows_written, max(1, len(train_split.shards)),
                               args.workers, study.batch, args.evals, args.max_samples)
    resolved = {k: v for k, v in _flatten(base.model_dump(mode="json")).items()
                if k not in _PER_RUN}
    settings = {
        "fixed": {"resolved_config": resolved,
                  "batch_per_worker": study.batch, "budget": study.budget,
                  "tune_seed": args.tune_seed, "splits": split},
        "config": str(args.config.resolve()), "budget": study.budget,
        "batch_per_worker": study.batch, "tune_seed": args.tune_seed, "splits": split,
        "lr_scaling": "none", "train_prepared_rows": train_split.rows_written,
        "seeds": sorted(set(saved.get("seeds", [])) | set(args.seeds)),
        "lrs": sorted(set(saved.get("lrs", [])) | set(args.lrs)),
        "workers": sorted(set(saved.get("workers", [])) | set(args.workers)),
        "algorithms": [a for a in ALGORITHMS if a in set(saved.get("algorithms", []))
                       | set(args.algorithms)],
        "invocations": saved.get("invocations", []) + [{
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "git": study.git,
            "threads": args.threads, "host_cpus": os.cpu_count()}],
    }
    if saved.get("fixed"):
        why = settings_conflict(saved, settings)
        if why:
            print(f"scaling: {out} holds a study with other settings ({why}); its runs would not "
                  "compare: use another --out", file=sys.stderr)
            return 2
    _write_json(out / "study.json", settings)
    b = study.budget
    print(f"scaling: budget {b['budget_samples']} samples ({100 * b['fraction_of_epoch']:.1f} % "
          f"of the epoch), {b['evals']} evaluations every {b['eval_interval_samples']} samples, "
          f"per-worker batch {study.batch}; steps " + ", ".join(
              f"n={n}: {steps_for(b, n, study.batch)[0]}" for n in args.workers), flush=True)
    if len(args.lrs) < 4:
        print(f"scaling: note: an lr grid of {len(args.lrs)} value(s); the study asks for at least "
              "four", flush=True)
    if args.tune_seed in args.seeds:
        print(f"scaling: note: the tuning seed {args.tune_seed} is one of --seeds, so its run at "
              "the chosen lr is reused (a small selection bias; --tune-seed outside --seeds "
              "avoids it)", flush=True)
    from ctrkit.errors import Interrupted
    stopped = None
    try:
        for n in args.only or args.workers:
            for a in dict.fromkeys(trained_as(a, n) for a in args.algorithms):
                for lr in args.lrs:
                    study.run(a, n, lr, args.tune_seed, "tune")
                choice = choose_lr(load_runs(study.runs_dir), a, n, args.tune_seed)
                if choice["lr"] is None:
                    print(f"scaling: {a} n={n}: no lr finished; no seeds run", flush=True)
                    continue
                for seed in args.seeds:
                    if seed != args.tune_seed:   # (that one is the tuning run at this lr)
                        study.run(a, n, choice["lr"], seed, "seed")
    except KeyboardInterrupt:
        stopped = "interrupted"
    except Interrupted as e:
        stopped = f"interrupted ({e})"
    finally:
        _finish(study, settings)
    c = study.counts
    print(f"scaling: {c['ran']} run(s) trained, {c['skipped']} skipped, {c['failed']} failed"
          + (f"; {stopped}: the finished runs are kept, run again to continue" if stopped else ""),
          flush=True)
    return 130 if stopped else 0


def _finish(study: Study, settings: dict) -> None:
    summary = summarize(load_runs(study.runs_dir), settings)
    _write_json(study.out / "summary.json", summary)
    plot(summary, study.out / "scaling.png")
    print_table(summary)
    print(f"scaling: wrote {study.out / 'summary.json'} and {study.out / 'scaling.png'}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
