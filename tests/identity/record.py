"""Bit-identity check for refactors: train short runs on the real Criteo slice, hash what they end with.

    python tests/identity/record.py --out FILE.json [--only NAME,...] [--check BASELINE.json]
    python tests/identity/record.py --compare BASELINE.json FILE.json   # two records, no training

Every run is one `ctrkit.train` call (a multi-worker run launches its ranks through torch's
launcher, as `ctrkit train` does). For each run the JSON holds sha256 digests of
- each rank's final resumable checkpoint (`last.pt`, or `last-step<k>-rank<r>.pt`), part by part:
  model, optimizers, schedulers, weight average, loop counters, traffic counters, RNG;
- the kept model (`best.pt`, or the files of a sharded run's `best/` folder);
- metrics.json and metrics.csv without the timing fields (wall_seconds, samples_per_s, wall_s,
  run_dir), plus the metrics themselves, readable.
`--check` compares with a recorded baseline and exits 1 naming every part that differs.

The runs cover each way a step is distributed (local Adam, local fused tables, allreduce, allreduce
with damsgrad's AMSGrad, dpsgd, damsgrad at n = 1 and n = 2, choco, a 2x2 shard-group choco run and
a k = 2 model-parallel damsgrad run) with and without the weight average (train.ema_decay), the
learning-rate scaling rule, the schedule, and `.pt` resume (the run is cut by max_steps and
resumed, locally and on every rank).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
SLICE = HERE.parents[3] / "shared" / "data" / "criteo" / "Lapis-Hong_Wide-ResDNN"
TIMING = {"wall_seconds", "samples_per_s", "run_dir", "wall_s"}

COMMON = ["data.format=criteo_tsv", f"data.train={SLICE / 'train.csv'}",
          f"data.valid={SLICE / 'dev.csv'}", f"data.test={SLICE / 'test.csv'}",
          "data.dense_transform=criteo_bucket", "data.min_count=2",
          "model.hidden_units=[32,16]", "model.embedding_dim=8", "model.dropout=0.1",
          "train.batch_size=256", "train.eval_batch_size=512", "train.eval_every=4",
          "train.max_steps=10", "train.progress=false", "train.tensorboard=false",
          "train.plot=false", "train.threads=1", "train.device=cpu", "train.prefetch=2",
          "train.log_every=3", "distributed.timeout_s=120"]

# name: (overrides, resume_at): resume_at > 0 trains to that step first, then resumes to the end
RUNS = {
    "local_adam": ([], 0),
    "local_adam_resume": ([], 6),
    "local_adam_ema_resume": (["train.ema_decay=0.9"], 5),
    "local_schedule_amsgrad": (["optimizer.schedule.name=cosine", "optimizer.schedule.warmup_steps=3",
                                "optimizer.sparse.name=amsgrad", "optimizer.sparse.rowwise=true",
                                "optimizer.dense.name=adamw", "optimizer.dense.weight_decay=0.01",
                                "train.lr_plateau.patience=0"], 0),
    "local_fused": (["optimizer.sparse.name=rowwise_adagrad", "optimizer.sparse.fused=true",
                     "optimizer.sparse.lr=0.01"], 0),
    "local_base_amsgrad": (["distributed.base_optimizer=amsgrad"], 0),
    "damsgrad_n1": (["distributed.algorithm=damsgrad"], 0),
    "allreduce_n2": (["distributed.workers=2", "distributed.algorithm=allreduce",
                      "distributed.lr_scaling=auto"], 0),
    "allreduce_n2_ema_resume": (["distributed.workers=2", "distributed.algorithm=allreduce",
                                 "train.ema_decay=0.9", "train.checkpoint_every=3"], 5),
    "allreduce_n2_amsgrad": (["distributed.workers=2", "distributed.algorithm=allreduce",
                              "distributed.base_optimizer=amsgrad"], 0),
    "dpsgd_n2": (["distributed.workers=2", "distributed.algorithm=dpsgd",
                  "optimizer.dense.lr=0.05", "optimizer.sparse.lr=0.05",
                  "distributed.lr_scaling=auto"], 0),
    "damsgrad_n2_resume": (["distributed.workers=2", "distributed.algorithm=damsgrad",
                            "distributed.lr_scaling=auto"], 6),
    "choco_n2": (["distributed.workers=2", "distributed.algorithm=choco"], 0),
    "choco_2x2_resume": (["distributed.workers=4", "distributed.shard_group_size=2",
                          "distributed.algorithm=choco", "train.checkpoint_every=4"], 4),
    "damsgrad_k2": (["distributed.workers=2", "distributed.shard_group_size=2",
                     "distributed.algorithm=damsgrad"], 0),
}


def _feed(h, obj) -> None:
    """Feed a nested checkpoint value into a hash, deterministically (dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.is_sparse:
            t = t.coalesce()
            _feed(h, t.indices())
            _feed(h, t.values())
        elif t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for x in obj:
            _feed(h, x)
        h.update(b"]")
    elif isinstance(obj, float):
        h.update(float.hex(obj).encode())
    else:
        h.update(repr(obj).encode())


def digest(obj) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:24]


PARTS = {"model": ("model",), "optimizers": ("optimizers",), "schedulers": ("schedulers",),
         "ema": ("ema",), "rng": ("rng",),
         "loop": ("step", "epoch", "batch_in_epoch", "samples", "best", "best_step", "bad_evals",
                  "stopped_early"),
         "traffic": ("bytes_sent", "collective_traffic", "traffic")}


def checkpoint_parts(path: Path) -> dict:
    st = torch.load(path, map_location="cpu", weights_only=False)
    out = {part: digest({k: st.get(k) for k in keys}) for part, keys in PARTS.items()}
    known = {k for keys in PARTS.values() for k in keys} | {"train_seconds"}
    out["other_keys"] = sorted(k for k in st if k not in known)
    return out


def final_files(run: Path) -> dict:
    ck = run / "checkpoints"
    out = {}
    if (ck / "last.pt").is_file():
        out["last"] = checkpoint_parts(ck / "last.pt")
    marker = ck / "last.json"
    if marker.is_file():
        m = json.loads(marker.read_text())
        for r in range(int(m["world"])):
            out[f"last_rank{r}"] = checkpoint_parts(ck / f"last-step{int(m['step']):08d}-rank{r}.pt")
    if (ck / "best.pt").is_file():
        out["best"] = digest(torch.load(ck / "best.pt", map_location="cpu", weights_only=False))
    if (ck / "best").is_dir():   # a sharded run's torch.distributed.checkpoint: its tensors
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader
        meta = FileSystemReader(str(ck / "best")).read_metadata()
        state = {k: torch.empty(v.size, dtype=v.properties.dtype)
                 for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}
        dcp.load(state, checkpoint_id=str(ck / "best"), no_dist=True)
        out["best_sharded"] = digest(state)
    return out


def clean_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMING}


def csv_rows(path: Path) -> list:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def train_run(name: str, root: Path) -> dict:
    import ctrkit
    overrides, resume_at = RUNS[name]
    run = root / name
    base = [*COMMON, f"data.prepared_dir={root / 'prepared'}", f"train.run_dir={run}", *overrides]
    t0 = time.time()
    if resume_at:
        ctrkit.train(ctrkit.load_config(None, [*base, f"train.max_steps={resume_at}"]))
        base.append("train.resume=true")
    metrics = ctrkit.train(ctrkit.load_config(None, base)).metrics
    return {"overrides": overrides, "resume_at": resume_at,
            "seconds": round(time.time() - t0, 1),
            "files": final_files(run),
            "metrics_digest": digest(clean_metrics(metrics)),
            "csv_digest": digest(csv_rows(run / "metrics.csv")),
            "metrics": {k: metrics.get(k) for k in ("valid", "test", "steps", "samples",
                                                    "best_step", "bytes_per_worker_step")}}


def _diff(a, b, path="") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in ("seconds",):
                continue
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--compare", type=Path, nargs=2, metavar=("BASELINE", "RECORD"),
                   help="compare two recorded files and exit")
    p.add_argument("--only", default="", help="comma list of run names (default: all)")
    p.add_argument("--check", type=Path, help="baseline JSON to compare with")
    p.add_argument("--keep", type=Path, help="keep the run folders here (default: a temp folder)")
    a = p.parse_args(argv)
    if a.compare:
        return _report(json.loads(a.compare[0].read_text())["runs"],
                       json.loads(a.compare[1].read_text())["runs"], None, a.compare[0])
    if not a.out:
        p.error("--out is required")
    names = [n for n in a.only.split(",") if n] or list(RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        p.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    root = a.keep or Path(tempfile.mkdtemp(prefix="ctrkit-identity-"))
    import ctrkit
    result = {"ctrkit": str(Path(ctrkit.__file__).parent), "runs": {}}
    try:
        for n in names:
            print(f"identity: {n} ...", flush=True)
            result["runs"][n] = train_run(n, root)
            print(f"identity: {n} done in {result['runs'][n]['seconds']} s "
                  f"(valid {result['runs'][n]['metrics']['valid']})", flush=True)
            a.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    if a.check:
        return _report(json.loads(a.check.read_text())["runs"], result["runs"], names, a.check)
    return 0


def _report(base: dict, runs: dict, names, baseline: Path) -> int:
    names = names or list(runs)
    diffs = []
    for n in names:
        if n not in base:
            diffs.append(f"{n}: not in the baseline")
            continue
        diffs += [f"{n}.{d}" for d in _diff(base[n], runs[n])]
    for d in diffs:
        print("DIFFERS:", d)
    print("identity: " + ("bit-identical to " if not diffs else f"{len(diffs)} differences from ")
          + str(baseline) + f" ({len(names)} runs)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
