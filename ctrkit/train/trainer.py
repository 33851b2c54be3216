"""One rank's training loop: `fit` runs epochs of `train_step`, evaluates, keeps the best model,
stops early, cuts the learning rate on plateaus, checkpoints and resumes.

The loop works over components built by ctrkit/train/setup.py and knows no algorithm: how a step
is distributed is the strategy's (ctrkit/strategies/), every checkpoint the manager's
(ctrkit/train/checkpointing.py). The entry points (`train`, `evaluate`) are in ctrkit/train/run.py.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ctrkit.config import Config
from ctrkit.data.schema import Schema
from ctrkit.distributed.runtime import DistEnv, broadcast_flag
from ctrkit.errors import CtrkitError, Interrupted
from ctrkit.optim.schedule import apply_schedule
from ctrkit.train.checkpoint import rng_state, set_rng_state
from ctrkit.train.checkpointing import mismatch
from ctrkit.train.interrupt import StopSignals, injected_fault, stop_agreed
from ctrkit.train.logging import RunLogger
from ctrkit.train.setup import build_components

# what a checkpoint holds of the loop itself
COUNTERS = ("step", "epoch", "batch_in_epoch", "samples", "best", "best_step", "bad_evals",
            "stopped_early", "train_seconds")


class Trainer:
    def __init__(self, cfg: Config, schema: Schema, run_dir: Path, env: DistEnv = DistEnv()) -> None:
        self.cfg, self.schema, self.run_dir, self.env = cfg, schema, run_dir, env
        self.device = env.device
        c = build_components(cfg, schema, run_dir, env)
        self.model, self.strategy, self.rates = c.model, c.strategy, c.rates
        self.optimizers, self.plateau, self.ema = c.optimizers, c.plateau, c.ema
        self.train_loader, self.eval_loaders = c.train_loader, c.eval_loaders
        self.checkpoints = c.checkpoints
        self.mode = "max" if cfg.train.early_stop.monitor == "valid_auc" else "min"
        self.step = self.epoch = self.batch_in_epoch = self.samples = self.best_step = 0
        self.best: Optional[float] = None
        self.bad_evals = 0
        self.stopped_early = False
        self.train_seconds = 0.0
        self.last_eval: Dict[str, float] = {}   # the last validation's distributed figures

    # ------------------------------------------------------------------ the loop
    def fit(self, logger: RunLogger, signals: Optional[StopSignals] = None) -> None:
        signals = signals or StopSignals()
        tc, sc = self.cfg.train, self.cfg.optimizer.schedule
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise CtrkitError("training split has fewer rows than one batch")
        self.model.train()
        # The planned length, not max_steps: a run cut short by max_steps and resumed follows the
        # same schedule as one that never stopped.
        planned = 0 if (sc.name == "constant" and not sc.warmup_steps) else \
            (sc.total_steps or tc.epochs * steps_per_epoch)
        stop = self.stopped_early or (tc.max_steps and self.step >= tc.max_steps)
        while not stop and self.epoch < tc.epochs:
            stop = self.run_epoch(logger, signals, steps_per_epoch, planned)

    def run_epoch(self, logger: RunLogger, signals: StopSignals, steps_per_epoch: int,
                  planned: int) -> bool:
        """The rest of the current epoch; True when training should stop."""
        tc = self.cfg.train
        self.train_loader.set_position(self.epoch, self.batch_in_epoch)
        bar = tqdm(total=steps_per_epoch, initial=self.batch_in_epoch,
                   disable=not tc.progress or not self.env.is_main,
                   desc=f"epoch {self.epoch + 1}/{tc.epochs}", unit="step", mininterval=1.0,
                   dynamic_ncols=True)
        window = {"t": time.perf_counter(), "samples": self.samples, "loss": 0.0, "n": 0}
        t_epoch, stop, evaluated_at = time.perf_counter(), False, -1
        for batch in self.train_loader:
            if planned:
                apply_schedule(self.optimizers, self.cfg.optimizer.schedule, self.step, planned)
            loss = self.train_step(batch)
            self.step += 1
            injected_fault(self.step, self.env.rank)
            self.batch_in_epoch += 1
            self.samples += batch.size
            window["loss"], window["n"] = window["loss"] + loss, window["n"] + 1
            bar.update(1)
            if self.step % tc.log_every == 0:
                self._log_train(logger, bar, window, t_epoch)
            if tc.eval_every and self.step % tc.eval_every == 0:
                evaluated_at = self.step
                stop = self.evaluate(logger) or stop
            self._checkpoint("step")
            stop = stop or bool(tc.max_steps and self.step >= tc.max_steps)
            if stop_agreed(signals, self.env, self.step):
                bar.close()
                self.train_seconds += time.perf_counter() - t_epoch
                self._checkpoint("stop")
                raise Interrupted(self.step, self.checkpoints.last_path())
            if stop:
                break
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # the epoch's time includes its queued work
        self.train_seconds += time.perf_counter() - t_epoch
        if self.batch_in_epoch >= steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            if evaluated_at != self.step:
                stop = self.evaluate(logger) or stop
        self._checkpoint("stop")
        return stop

    def train_step(self, batch) -> torch.Tensor:
        """One step; returns the loss as a tensor (reading it would wait for the GPU)."""
        batch = batch.to(self.device)
        logits = batch.logits(self.model)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        self.strategy.after_backward(self.model)
        if self.ema:
            self.ema.capture()
        for o in self.optimizers:
            o.step()
        if self.ema:
            self.ema.update()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        return loss.detach()

    def _log_train(self, logger: RunLogger, bar, window: dict, t_epoch: float) -> None:
        mean_loss = float(window["loss"]) / window["n"]   # (waits for the device's queue)
        if not math.isfinite(mean_loss):
            raise CtrkitError(f"rank {self.env.rank}: training diverged: mean loss {mean_loss} over "
                              f"steps {self.step - window['n'] + 1}-{self.step}; lower the "
                              "learning rate")
        now = time.perf_counter()
        sps = (self.samples - window["samples"]) / max(now - window["t"], 1e-9)
        logger.log({"step": self.step, "epoch": self.epoch, "samples": self.samples,
                    "split": "train", "loss": mean_loss, "lr": self._lr(), "samples_per_s": sps,
                    "wall_s": self.train_seconds + now - t_epoch,
                    "bytes_per_worker_step": self.strategy.bytes_sent / max(self.step, 1)})
        bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{sps:,.0f}")
        window.update(t=now, samples=self.samples, loss=0.0, n=0)

    def _checkpoint(self, event: str) -> None:
        if self.checkpoints.due(self.step, event):
            self.checkpoints.save(self.step, self.state_dict())

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, logger: RunLogger) -> bool:
        """Validate the model to keep, update best / early stopping / plateau; True: stop."""
        tc = self.cfg.train
        if "valid" not in self.eval_loaders:
            self._checkpoint("eval")
            return False
        with self._averaged():
            m, keep, self.last_eval = self.strategy.validate(self.model, self.eval_loaders["valid"],
                                                             self.step)
            value = m["auc"] if self.mode == "max" else m["logloss"]
            better = not math.isnan(value) and (self.best is None or (
                value > self.best if self.mode == "max" else value < self.best))
            if better:
                self.checkpoints.save_best(self.model, keep, self.step)
        logger.log({"step": self.step, "epoch": self.epoch, "samples": self.samples,
                    "split": "valid", "auc": m["auc"], "logloss": m["logloss"], "lr": self._lr(),
                    **self.last_eval})
        if better:
            self.best, self.best_step, self.bad_evals = value, self.step, 0
        else:
            self.bad_evals += 1
        for s in self.plateau:
            s.step(value)
        stop = broadcast_flag(tc.early_stop.enabled and self.bad_evals >= tc.early_stop.patience,
                              self.env)
        self.stopped_early = self.stopped_early or stop
        self._checkpoint("eval")
        return stop

    def final_metrics(self) -> dict:
        """Reload the kept model and evaluate it on valid and test."""
        if self.env.active:
            dist.barrier()
        self._load_kept_weights()
        out: Dict[str, object] = {}
        if self.strategy.evaluates_average:
            for split, loader in self.eval_loaders.items():
                out[split] = self.strategy.evaluate(self.model, split, loader)
        if self.env.active:
            out.update(self.last_eval)
            out.update(self.strategy.summary(self.model, self.step))
        samples = self.samples * self.env.world
        out.update(device=str(self.device),
                   backend=dist.get_backend() if dist.is_initialized() else None,
                   lr_scale={"dense": self.rates.scale[0], "tables": self.rates.scale[1]},
                   samples=samples, steps=self.step, epochs=self.epoch, best_step=self.best_step,
                   stopped_early=self.stopped_early, wall_seconds=round(self.train_seconds, 3),
                   samples_per_s=round(samples / max(self.train_seconds, 1e-9), 1),
                   model=self.cfg.model.name, run_dir=str(self.run_dir))
        return out

    def _load_kept_weights(self) -> None:
        """The validated best; without validation the network average (several ranks) or the
        weight average (train.ema_decay), else the last step's weights."""
        if self.checkpoints.load_best(self.model):
            return
        if self.env.active:
            with self._averaged():
                state = self.strategy.network_average(self.model)["state"]
            self.model.load_state_dict(state)
        elif self.ema:
            self.ema.copy_to()

    def _averaged(self):
        """The weights to evaluate and keep: the EMA's while in the block (train.ema_decay)."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()

    # ------------------------------------------------------------------ learning rates
    def _lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"]) if self.optimizers else 0.0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.plateau],
                **{k: getattr(self, k) for k in COUNTERS}, "rng": rng_state(),
                **self.strategy.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None}

    def load_state_dict(self, st: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(st["model"])
        except (RuntimeError, KeyError) as e:
            raise CtrkitError(f"{path}: does not match model '{self.cfg.model.name}' of this "
                              f"config ({mismatch(e)}); resume with the run's own config "
                              f"({self.run_dir / 'config.yaml'})") from None
        for o, s in zip(self.optimizers, st["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.plateau, st["schedulers"]):
            sch.load_state_dict(s)
        for k in COUNTERS:
            setattr(self, k, st[k])
        set_rng_state(st["rng"], cuda=self.device.type == "cuda")
        saved = st.get("ema")
        if self.ema and saved and saved["decay"] == self.ema.decay:
            self.ema.load_state_dict(saved)
        elif self.ema and self.env.is_main:   # (an average of another decay does not continue)
            why = "no weight average" if not saved else f"an average with decay {saved['decay']}"
            print(f"ctrkit: the checkpoint has {why}; train.ema_decay={self.ema.decay} starts a "
                  f"new one at step {self.step}", flush=True)
        self.strategy.load_state_dict(st)
