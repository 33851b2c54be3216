"""One benchmark training run: a config trained for a fixed number of steps through `ctrkit.train`
(the trainer's own loop and step), its metrics kept as one result row, its checkpoints removed.

Used by bench/gossip_compression.py and bench/sharding.py, which compare such runs on the same
number of samples.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import ValidationError

import ctrkit
from ctrkit.config import Config
from ctrkit.data.preprocess import open_prepared
from ctrkit.errors import ConfigError
from ctrkit.ownership import OwnedFolder
from ctrkit.train.run_dir import CHECKPOINTS, RUN

DPSGD_LR = 0.05   # dpsgd is plain SGD: its own learning rate, not scaled with the workers


def train_rows(cfg: Config) -> int:
    """Rows of the prepared training split (prepared first when missing or stale)."""
    with open_prepared(cfg, progress=False) as schema:
        return schema.splits["train"].rows_written


def run_config(cfg: Config, run_dir: Path, algorithm: str, workers: int, steps: int,
               dpsgd_lr: float = DPSGD_LR, **distributed) -> Config:
    """One run's config: `algorithm` on `workers` workers for `steps` steps (evaluated and saved
    once, at the end), no early stop or lr drop, no progress bar, TensorBoard or plots.
    `distributed`: other distributed.* keys (compressor, gamma, shard_group_size, ...)."""
    c = cfg.model_copy(deep=True)
    try:
        if algorithm == "dpsgd":
            c.optimizer.dense.lr = c.optimizer.sparse.lr = dpsgd_lr
            c.distributed.lr_scaling = "none"
        c.distributed.workers, c.distributed.algorithm = workers, algorithm
        for key, value in distributed.items():
            setattr(c.distributed, key, value)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err.get("loc", ())) or "distributed"
        raise ConfigError(f"distributed.{key}: {err['msg']} (run {algorithm} with "
                          f"{workers} workers)") from None
    c.train.run_dir, c.train.overwrite, c.train.resume = str(run_dir), True, False
    c.train.max_steps = c.train.eval_every = c.train.checkpoint_every = steps
    c.train.early_stop.enabled = c.train.lr_plateau.enabled = False
    c.train.progress = c.train.tensorboard = c.train.plot = False
    return c


def train_and_clean(c: Config) -> dict:
    """Train one run and return its metrics; its checkpoints are deleted afterwards.

    Why: every rank's resume state on the reference data is ~0.9 GB, so one 8-worker run leaves
    7 GB behind, and a sweep filled the disk. A benchmark needs the metrics, which stay in the
    run folder (metrics.json, metrics.csv).
    """
    metrics = ctrkit.train(c).metrics
    OwnedFolder(Path(c.train.run_dir), RUN).clear(under=CHECKPOINTS)   # (only ctrkit's files)
    return metrics


def run_one(c: Config) -> dict:
    """Train a `run_config` config; its result row (AUC, logloss, traffic, memory, time)."""
    t = time.time()
    m = train_and_clean(c)
    steps, n = c.train.max_steps, c.distributed.workers
    per_step = m.get("bytes_per_worker_step", 0.0)
    return {"algorithm": c.distributed.algorithm, "workers": n, "steps": steps,
            "samples": steps * n * c.train.batch_size,
            "final_auc": m["valid"]["auc"], "final_logloss": m["valid"]["logloss"],
            "auc_spread": m.get("auc_spread", 0.0),
            "lr_scale": m["lr_scale"],
            "consensus_embedding": m.get("consensus_embedding"),
            "consensus_dense": m.get("consensus_dense"),
            "bytes_per_worker_step": per_step, "total_bytes_per_worker": per_step * steps,
            "traffic": {k: v for k, v in m.items()
                        if k.endswith("_per_step") or k == "compression_ratio"},
            "shard_group_size": m.get("shard_group_size", 1),
            "embedding_bytes_per_rank": m.get("embedding_bytes_per_rank"),
            "wall_s": round(time.time() - t, 1)}


def write_json(path: Path, obj: dict) -> None:
    """Write a result file (indented JSON, as in bench/results/)."""
    path.write_text(json.dumps(obj, indent=1))
