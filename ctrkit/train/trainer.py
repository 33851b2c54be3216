"""The single-process training loop: BCE loss, sparse+dense optimizers, evaluation, early stopping,
learning-rate drop on plateau, checkpoints and resume, progress and metric logs."""
from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ctrkit.config import Config, dump_config
from ctrkit.data.loader import BatchLoader
from ctrkit.data.schema import SCHEMA_FILE, Schema
from ctrkit.errors import CtrkitError
from ctrkit.models import build_model
from ctrkit.models.fused import FusedEmbeddingBags, fuse_embeddings
from ctrkit.optim.build import build_optimizers
from ctrkit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ctrkit.train.evaluate import evaluate_split
from ctrkit.train.logging import RunLogger, plot_curves, write_json

LAST, BEST = "last.pt", "best.pt"


@dataclass
class RunResult:
    metrics: Dict[str, object]
    run_dir: Path
    model: Optional[nn.Module] = field(default=None, repr=False)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def load_or_prepare(cfg: Config, progress: bool) -> Schema:
    """The prepared data for this config; runs `prepare` first if it has not been done."""
    root = Path(cfg.data.prepared_dir)
    if not (root / SCHEMA_FILE).is_file():
        from ctrkit.data.preprocess import prepare
        prepare(cfg, progress=progress)
    return Schema.load(root)


def build_training_model(cfg: Config, schema: Schema) -> nn.Module:
    """The configured model, with fbgemm's fused TBE swapped in when `optimizer.sparse.fused`."""
    model = build_model(cfg.model, schema)
    if cfg.optimizer.sparse.fused:
        fuse_embeddings(model, cfg.optimizer.sparse)
    return model


def _prepare_run_dir(cfg: Config) -> Path:
    run_dir = Path(cfg.train.run_dir)
    if cfg.train.resume:
        if not (run_dir / "checkpoints" / LAST).is_file():
            raise CtrkitError(f"{run_dir}: no checkpoint to resume from (checkpoints/{LAST})")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.train.overwrite:
            raise CtrkitError(f"{run_dir} is not empty; set train.resume=true to continue it or "
                              "train.overwrite=true to start over")
        if not (run_dir / "config.yaml").exists():
            raise CtrkitError(f"{run_dir} is not empty and is not a ctrkit run; refusing to delete it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Trainer:
    def __init__(self, cfg: Config, schema: Schema, run_dir: Path) -> None:
        self.cfg, self.schema, self.run_dir = cfg, schema, run_dir
        tc = cfg.train
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed)
        random.seed(tc.seed)
        self.model = build_training_model(cfg, schema)
        self.optimizers = build_optimizers(self.model, cfg.optimizer)
        mode = "max" if tc.early_stop.monitor == "valid_auc" else "min"
        self.mode = mode
        pl = tc.lr_plateau
        self.schedulers = [torch.optim.lr_scheduler.ReduceLROnPlateau(
            o, mode=mode, factor=pl.factor, patience=pl.patience, min_lr=pl.min_lr)
            for o in self.optimizers] if pl.enabled else []
        self.train_loader = BatchLoader(schema, "train", tc.batch_size, shuffle=tc.shuffle,
                                        seed=tc.seed, prefetch=tc.prefetch)
        self.eval_loaders = {s: BatchLoader(schema, s, tc.eval_batch_size, prefetch=tc.prefetch)
                             for s in ("valid", "test") if s in schema.splits}
        self.step = self.epoch = self.batch_in_epoch = self.samples = 0
        self.best: Optional[float] = None
        self.best_step = 0
        self.bad_evals = 0
        self.stopped_early = False
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples": self.samples, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "stopped_early": self.stopped_early,
                "train_seconds": self.train_seconds, "rng": rng_state()}

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        for o, s in zip(self.optimizers, st["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, st["schedulers"]):
            sch.load_state_dict(s)
        for k in ("step", "epoch", "batch_in_epoch", "samples", "best", "best_step", "bad_evals",
                  "stopped_early", "train_seconds"):
            setattr(self, k, st[k])
        set_rng_state(st["rng"])
        self._sync_fused_lr()

    def save(self, name: str) -> None:
        save_checkpoint(self.run_dir / "checkpoints" / name, self.state())

    # ------------------------------------------------------------------ loop
    def train_step(self, batch) -> float:
        logits = self.model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        for o in self.optimizers:
            o.step()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"]) if self.optimizers else 0.0

    def _evaluate(self, logger: RunLogger) -> bool:
        """Validate, update best/early stopping/plateau, checkpoint; True when training should stop."""
        tc = self.cfg.train
        if "valid" not in self.eval_loaders:
            self.save(LAST)
            return False
        m = evaluate_split(self.model, self.eval_loaders["valid"])
        logger.log({"step": self.step, "epoch": self.epoch, "samples": self.samples, "split": "valid",
                    "auc": m["auc"], "logloss": m["logloss"], "lr": self._lr()})
        value = m["auc"] if self.mode == "max" else m["logloss"]
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better and not math.isnan(value):
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            save_checkpoint(self.run_dir / "checkpoints" / BEST, {"model": self.model.state_dict(),
                                                                  "step": self.step})
        else:
            self.bad_evals += 1
        for s in self.schedulers:
            s.step(value)
        self._sync_fused_lr()
        stop = tc.early_stop.enabled and self.bad_evals >= tc.early_stop.patience
        self.stopped_early = self.stopped_early or stop
        self.save(LAST)
        return stop

    def _sync_fused_lr(self) -> None:
        """LR-on-plateau scales fused tables' learning rate by the same factor as the dense one."""
        if not self.optimizers:
            return
        scale = self._lr() / self.cfg.optimizer.dense.lr
        for m in self.model.modules():
            if isinstance(m, FusedEmbeddingBags):
                m.set_learning_rate(self.cfg.optimizer.sparse.lr * scale)

    def fit(self, logger: RunLogger) -> None:
        tc = self.cfg.train
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise CtrkitError("training split has fewer rows than one batch")
        self.model.train()
        stop = self.stopped_early or (tc.max_steps and self.step >= tc.max_steps)
        while not stop and self.epoch < tc.epochs:
            self.train_loader.set_position(self.epoch, self.batch_in_epoch)
            bar = tqdm(total=steps_per_epoch, initial=self.batch_in_epoch, disable=not tc.progress,
                       desc=f"epoch {self.epoch + 1}/{tc.epochs}", unit="step", mininterval=1.0,
                       dynamic_ncols=True)
            t_last, n_last, loss_sum, loss_n = time.perf_counter(), self.samples, 0.0, 0
            t_epoch = time.perf_counter()
            evaluated_at = -1
            for batch in self.train_loader:
                loss = self.train_step(batch)
                self.step += 1
                self.batch_in_epoch += 1
                self.samples += batch.size
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
                bar.update(1)
                if self.step % tc.log_every == 0:
                    now = time.perf_counter()
                    sps = (self.samples - n_last) / max(now - t_last, 1e-9)
                    logger.log({"step": self.step, "epoch": self.epoch, "samples": self.samples,
                                "split": "train", "loss": loss_sum / loss_n, "lr": self._lr(),
                                "samples_per_s": sps, "wall_s": self.train_seconds + now - t_epoch})
                    bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", sps=f"{sps:,.0f}")
                    t_last, n_last, loss_sum, loss_n = now, self.samples, 0.0, 0
                if tc.eval_every and self.step % tc.eval_every == 0:
                    evaluated_at = self.step
                    if self._evaluate(logger):
                        stop = True
                elif tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save(LAST)
                if tc.max_steps and self.step >= tc.max_steps:
                    stop = True
                if stop:
                    break
            bar.close()
            self.train_seconds += time.perf_counter() - t_epoch
            if self.batch_in_epoch >= steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                if evaluated_at != self.step and self._evaluate(logger):
                    stop = True
            else:
                self.save(LAST)

    def final_metrics(self) -> dict:
        """Reload the best checkpoint (when validation picked one) and evaluate valid and test."""
        best = self.run_dir / "checkpoints" / BEST
        if best.is_file():
            self.model.load_state_dict(load_checkpoint(best)["model"])
        out: Dict[str, object] = {}
        for split, loader in self.eval_loaders.items():
            out[split] = evaluate_split(self.model, loader)
        out.update(samples=self.samples, steps=self.step, epochs=self.epoch,
                   best_step=self.best_step, stopped_early=self.stopped_early,
                   wall_seconds=round(self.train_seconds, 3),
                   samples_per_s=round(self.samples / max(self.train_seconds, 1e-9), 1),
                   model=self.cfg.model.name, run_dir=str(self.run_dir))
        return out


def train(cfg: Config, progress: Optional[bool] = None) -> RunResult:
    """Train the configured model; returns the final metrics (also written to metrics.json)."""
    if progress is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": progress})})
    tc = cfg.train
    set_threads(tc.threads)
    schema = load_or_prepare(cfg, tc.progress)
    run_dir = _prepare_run_dir(cfg)
    trainer = Trainer(cfg, schema, run_dir)
    if tc.resume:
        trainer.load_state(load_checkpoint(run_dir / "checkpoints" / LAST))
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    logger = RunLogger(run_dir, tensorboard=tc.tensorboard, append=tc.resume)
    try:
        trainer.fit(logger)
        metrics = trainer.final_metrics()
        for split in ("valid", "test"):
            if split in metrics:
                m = metrics[split]
                logger.log({"step": trainer.step, "epoch": trainer.epoch, "samples": trainer.samples,
                            "split": f"final_{split}", "auc": m["auc"], "logloss": m["logloss"]})
    finally:
        logger.close()
    write_json(run_dir / "metrics.json", metrics)
    if tc.plot:
        plot_curves(run_dir)
    return RunResult(metrics, run_dir, trainer.model)


def evaluate(cfg: Config, checkpoint: Optional[str] = None) -> dict:
    """Evaluate a checkpoint (default: the run's best, else last) on valid and test."""
    set_threads(cfg.train.threads)
    schema = load_or_prepare(cfg, cfg.train.progress)
    run_dir = Path(cfg.train.run_dir)
    path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / BEST
    if checkpoint is None and not path.is_file():
        path = run_dir / "checkpoints" / LAST
    if not path.is_file():
        raise CtrkitError(f"{path}: checkpoint not found")
    model = build_training_model(cfg, schema)
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except RuntimeError as e:
        raise CtrkitError(f"{path}: does not match model '{cfg.model.name}' "
                          f"({str(e).splitlines()[0]})") from None
    out: Dict[str, object] = {"checkpoint": str(path), "model": cfg.model.name}
    for split in ("valid", "test"):
        if split in schema.splits:
            out[split] = evaluate_split(model, BatchLoader(schema, split, cfg.train.eval_batch_size,
                                                           prefetch=cfg.train.prefetch))
    run_dir.mkdir(parents=True, exist_ok=True)
    path_json = run_dir / "metrics.json"
    merged = {}
    if path_json.is_file():
        import json
        merged = json.loads(path_json.read_text())
    merged.update(out)
    write_json(path_json, merged)
    return out
