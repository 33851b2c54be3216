"""The single-process training loop: BCE loss, sparse+dense optimizers, evaluation, early stopping,
learning-rate drop on plateau, checkpoints and resume, progress and metric logs."""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ctrkit.config import Config, base_optimizer_conflict, dump_config, ema_conflict
from ctrkit.distributed.runtime import (DistEnv, broadcast_flag, check_identical_replicas,
                                        comm_device, gather_floats, init_distributed,
                                        is_comm_failure, launch_workers, launched_by_torchrun,
                                        network_average, shutdown)
from ctrkit.data.loader import BatchLoader
from ctrkit.data.preprocess import open_prepared
from ctrkit.data.schema import Schema
from ctrkit.errors import ConfigError, CtrkitError, Interrupted
from ctrkit.models import build_model
from ctrkit.models.fused import FusedEmbeddingBags, fuse_embeddings
from ctrkit.optim.build import build_optimizers, worker_lr_scale
from ctrkit.optim.decentralized import ALGORITHMS as DECENTRALIZED, choco_options
from ctrkit.optim.schedule import apply_schedule
from ctrkit.ownership import OwnedFolder, atomic_write_text, is_within
from ctrkit.train.checkpoint import (LAST, last_rank_checkpoint, load_checkpoint, rng_state,
                                     save_checkpoint, save_on_every_rank, set_rng_state)
from ctrkit.train.ema import WeightEMA, load_averaged_weights
from ctrkit.train.evaluate import evaluate_split
from ctrkit.train.interrupt import StopSignals
from ctrkit.train.memory import keep_freed_memory
from ctrkit.train.logging import NullLogger, RunLogger, plot_curves, read_json, write_json
from ctrkit.train.run_dir import (CHECKPOINTS, RUN, SHARDED_BEST_TREES, open_run_dir,
                                  resume_conflict)

BEST = "best.pt"
BEST_SHARDED = "best"   # torch.distributed.checkpoint folder of a sharded run's best model
INTERRUPT_POLL = 10   # steps between the ranks' agreement on a stop signal


@dataclass
class RunResult:
    metrics: Dict[str, object]
    run_dir: Path
    model: Optional[nn.Module] = field(default=None, repr=False)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def load_or_prepare(cfg: Config, progress: bool) -> Schema:
    """The prepared data for this config; runs `prepare` first if it is missing or stale."""
    with open_prepared(cfg, progress) as schema:
        return schema


def build_training_model(cfg: Config, schema: Schema,
                         device: torch.device = torch.device("cpu")) -> nn.Module:
    """The configured model on `device`, with fbgemm's fused TBE swapped in when
    `optimizer.sparse.fused`."""
    model = build_model(cfg.model, schema)
    if cfg.optimizer.sparse.fused:
        fuse_embeddings(model, cfg.optimizer.sparse, device)
    return model.to(device)


def _mismatch(e: RuntimeError, limit: int = 300) -> str:
    """The useful line of load_state_dict's error (its first line only says that there are errors):
    which keys are missing or unexpected, or which sizes differ."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else \
        (lines[0] if lines else type(e).__name__)
    return detail if len(detail) <= limit else detail[:limit] + " ..."


class Trainer:
    def __init__(self, cfg: Config, schema: Schema, run_dir: Path, env: DistEnv = DistEnv()) -> None:
        self.cfg, self.schema, self.run_dir, self.env = cfg, schema, run_dir, env
        tc, dc = cfg.train, cfg.distributed
        # Same seed on every rank: replicas start identical, as gossip averaging assumes.
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed)
        random.seed(tc.seed)
        self.device = env.device   # (torch.manual_seed above seeds the GPUs too)
        sharded = env.active and dc.shard_group_size > 1
        # A model whose tables get sharded is built on the host: only its shards go to the GPU.
        self.model = build_training_model(cfg, schema,
                                          torch.device("cpu") if sharded else self.device)
        self.grid = None
        if sharded:
            from ctrkit.distributed.sharding import make_grid, shard_model
            backend = dist.get_backend()
            if self.device.type == "cuda" and (backend != "nccl" or tc.device.startswith("cuda:")):
                raise CtrkitError("sharded tables on GPUs need one GPU per rank with NCCL "
                                  f"(train.device=cuda or auto, not {tc.device} with {backend})")
            self.grid = make_grid(env.rank, env.world, dc.shard_group_size,
                                  "cuda" if backend == "nccl" else "cpu")
            plans = shard_model(self.model, self.grid, backend, self.device)
            self.model.to(self.device)
            if env.is_main:
                print(f"ctrkit: {self.grid.groups} shard groups of {self.grid.k} ranks; rank g*k+p "
                      "gossips with rank h*k+p of neighbouring groups h\n" + "\n".join(plans),
                      flush=True)
        if tc.init_from:
            self._init_weights(Path(tc.init_from))
        # dpsgd/damsgrad keep their own update rule on a single worker too (no neighbours), so
        # n = 1 is the honest baseline of a scaling curve; allreduce on one worker is local, with
        # the configured optimizers (or damsgrad's AMSGrad: distributed.base_optimizer=amsgrad).
        self.algorithm = dc.algorithm if (env.active or dc.algorithm in DECENTRALIZED) \
            else "local"
        self.topology = None
        self.exchange = None
        problem = base_optimizer_conflict(cfg)   # (a config changed after validation lands here)
        if problem:
            raise ConfigError(problem)
        # allreduce/local with distributed.base_optimizer=amsgrad step with damsgrad's AMSGrad
        amsgrad = dc.base_optimizer == "amsgrad" and self.algorithm not in DECENTRALIZED
        # Wire bytes of allreduce's collectives, plus all that a resumed run had sent before.
        self.comm_bytes = 0.0
        # allreduce: payload_bytes (what this rank contributes) and wire_bytes of the averages
        self.collective: Counter = Counter()
        o = cfg.optimizer
        # n = every rank's batch in a step (with sharding too: a group steps on k batches)
        self.lr_scale = worker_lr_scale(dc.lr_scaling, self.algorithm, env.world,
                                        dense_adaptive=amsgrad or o.dense.name != "sgd",
                                        tables_adaptive=amsgrad or o.sparse.name != "sgd")
        if self.lr_scale != (1.0, 1.0):
            fd, ft = self.lr_scale
            cfg = cfg.model_copy(update={"optimizer": o.model_copy(update={
                "dense": o.dense.model_copy(update={"lr": o.dense.lr * fd}),
                "sparse": o.sparse.model_copy(update={
                    "lr": o.sparse.lr * ft,
                    "lr_overrides": {k: v * ft for k, v in o.sparse.lr_overrides.items()}})})})
            self.cfg = cfg
            if env.rank == 0:
                print(f"ctrkit: {dc.lr_scaling} lr scaling for {env.world} workers: dense lr "
                      f"x{fd:.3g} ({cfg.optimizer.dense.lr:.3g}), tables x{ft:.3g} "
                      f"({cfg.optimizer.sparse.lr:.3g})", flush=True)
        if self.algorithm in DECENTRALIZED or amsgrad:
            from ctrkit.comm.exchange import NeighborExchange
            from ctrkit.comm.topology import build_topology, single_worker
            from ctrkit.optim.decentralized import DecentralizedOptimizer
            rows = max([m.num_rows for m in self.model.modules() if hasattr(m, "num_rows")] or [0])
            if amsgrad:
                # damsgrad's optimizer on a one-worker view (this rank is its rank 0; the exchange
                # has no neighbours and sends nothing), stepping after the gradient average: the
                # very optimizer damsgrad has at n = 1. Not self.exchange: this is no gossip run.
                algorithm, gossip, rank = "damsgrad", single_worker(), 0
                exchange = NeighborExchange(0, (), num_rows_hint=rows)
            else:
                # The decentralized workers are the shard groups (each rank one, when not sharded).
                workers = env.world // (self.grid.k if self.grid else 1)
                self.topology = build_topology(dc.topology, workers, dc.edges)
                gossip = self.topology
                if self.grid:
                    from ctrkit.distributed.sharding import lift_topology
                    gossip = lift_topology(self.topology, self.grid.k)
                algorithm, rank = self.algorithm, env.rank
                exchange = self.exchange = NeighborExchange(env.rank, gossip.neighbors[env.rank],
                                                            num_rows_hint=rows)
            so = cfg.optimizer.sparse
            self.optimizers = [DecentralizedOptimizer(
                self.model, algorithm, gossip, rank, exchange,
                dense_lr=cfg.optimizer.dense.lr, sparse_lr=so.lr, betas=tuple(so.betas),
                eps=dc.eps, rowwise=dc.rowwise_tracker, bias_correction=dc.bias_correction,
                group_size=self.grid.k if self.grid else 1, gossip_tol=dc.gossip_tol,
                **choco_options(cfg, self.model))]
            if self.algorithm == "choco" and env.is_main:
                mb = self.optimizers[0].public_copy_bytes() / 2 ** 20
                print(f"ctrkit: choco with {dc.compressor} (dense {dc.dense_compressor or dc.compressor}), "
                      f"gamma {dc.gamma}, tracker {dc.tracker}"
                      + (f" every {dc.tracker_every} steps" if dc.tracker == "exact" else "")
                      + f"; public copies x_hat and s hold {mb:.1f} MB per worker", flush=True)
        else:
            self.optimizers = build_optimizers(self.model, cfg.optimizer)
        problem = ema_conflict(cfg)   # (a config changed after validation lands here)
        if problem:
            raise ConfigError(problem)
        self.ema = WeightEMA(self.model, tc.ema_decay) if tc.ema_decay else None
        mode = "max" if tc.early_stop.monitor == "valid_auc" else "min"
        self.mode = mode
        pl = tc.lr_plateau
        self.schedulers = [torch.optim.lr_scheduler.ReduceLROnPlateau(
            o, mode=mode, factor=pl.factor, patience=pl.patience, min_lr=pl.min_lr)
            for o in self.optimizers] if pl.enabled else []
        # For a GPU the loader pins batches. It still finds the distinct ids on the host: on the
        # GPU their count is a data-dependent size, i.e. a host sync per step (measured on an H100:
        # 4.4 ms per step with the sort on the GPU, 4.0 ms with it in the loader thread).
        pin = self.device.type == "cuda"
        self.train_loader = BatchLoader(schema, "train", tc.batch_size, shuffle=tc.shuffle,
                                        seed=tc.seed, prefetch=tc.prefetch, rank=env.rank,
                                        world_size=env.world, pin_memory=pin)
        self.eval_loaders = {s: BatchLoader(schema, s, tc.eval_batch_size, prefetch=tc.prefetch,
                                            pin_memory=pin)
                             for s in ("valid", "test") if s in schema.splits}
        self.step = self.epoch = self.batch_in_epoch = self.samples = 0
        self.best: Optional[float] = None
        self.best_step = 0
        self.bad_evals = 0
        self.stopped_early = False
        self.train_seconds = 0.0
        self.last_eval: Dict[str, float] = {}

    def _init_weights(self, path: Path) -> None:
        """`train.init_from`: a DCP folder loads into any layout; a `.pt` file into unsharded
        tables only (its flat per-dimension weights do not split into shards)."""
        if (path / ".metadata").is_file():
            from ctrkit.distributed.sharding import load_model
            load_model(self.model, path, group=self.grid.shard_pg if self.grid else None)
            return
        if not path.is_file():
            raise CtrkitError(f"train.init_from: {path} is neither a checkpoint file nor a "
                              "torch.distributed.checkpoint folder")
        if self.grid:
            raise CtrkitError(f"train.init_from: {path} is a .pt checkpoint; a sharded run "
                              "starts from a torch.distributed.checkpoint folder (checkpoints/best "
                              "of a sharded run, or `ctrkit.distributed.sharding.save_model`)")
        try:
            load_averaged_weights(self.model, load_checkpoint(path))
        except (RuntimeError, KeyError, ValueError) as e:
            raise CtrkitError(f"train.init_from: {path} does not match model "
                              f"'{self.cfg.model.name}' ({_mismatch(e)})") from None

    @property
    def bytes_sent(self) -> float:
        """Wire bytes this worker sent: gossip's messages to its neighbours, allreduce's share of
        its collectives (ctrkit/comm/collective.py)."""
        return self.comm_bytes + (self.exchange.bytes_sent if self.exchange else 0)

    def traffic(self) -> Dict[str, float]:
        """Bytes per worker and step. allreduce: `payload_bytes_per_step` (what a rank contributes
        to the averages) and `wire_bytes_per_step` (what it sends for them). Gossip: by kind, what
        exact gossip would have sent, the ratio, and `wire_bytes_per_step`."""
        steps = max(self.step, 1)
        if self.algorithm == "allreduce":
            return {f"{k}_per_step": self.collective[k] / steps
                    for k in ("payload_bytes", "wire_bytes")}
        opt = self.optimizers[0] if self.optimizers else None
        tr = getattr(opt, "traffic", None)
        if self.algorithm not in DECENTRALIZED or not tr:
            return {}
        out = {f"{k}_per_step": v / steps for k, v in sorted(tr.items())}
        sent = opt.bytes_sent
        out["compression_ratio"] = tr["exact_bytes"] / sent if sent else 1.0
        # Gossip's bytes are per-neighbour messages, every byte handed to isend: already wire.
        out["wire_bytes_per_step"] = self.bytes_sent / steps
        return out

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"model": self.model.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples": self.samples, "best": self.best, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "stopped_early": self.stopped_early,
                "train_seconds": self.train_seconds, "rng": rng_state(),
                "bytes_sent": self.bytes_sent, "collective_traffic": dict(self.collective),
                "traffic": dict(getattr(self.optimizers[0], "traffic", {})) if self.optimizers else {},
                "ema": self.ema.state_dict() if self.ema else None}

    def load_state(self, st: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(st["model"])
        except (RuntimeError, KeyError) as e:
            raise CtrkitError(f"{path}: does not match model '{self.cfg.model.name}' of this "
                              f"config ({_mismatch(e)}); resume with the run's own config "
                              f"({self.run_dir / 'config.yaml'})") from None
        for o, s in zip(self.optimizers, st["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, st["schedulers"]):
            sch.load_state_dict(s)
        for k in ("step", "epoch", "batch_in_epoch", "samples", "best", "best_step", "bad_evals",
                  "stopped_early", "train_seconds"):
            setattr(self, k, st[k])
        set_rng_state(st["rng"], cuda=self.device.type == "cuda")
        saved = st.get("ema")
        if self.ema and saved and saved["decay"] == self.ema.decay:
            self.ema.load_state_dict(saved)
        elif self.ema and self.env.is_main:   # (an average of another decay does not continue)
            why = "no weight average" if not saved else f"an average with decay {saved['decay']}"
            print(f"ctrkit: the checkpoint has {why}; train.ema_decay={self.ema.decay} starts a "
                  f"new one at step {self.step}", flush=True)
        self.comm_bytes = st.get("bytes_sent", 0)
        if "collective_traffic" in st:
            self.collective = Counter(st["collective_traffic"])
        elif self.algorithm == "allreduce":   # a checkpoint from before wire bytes were counted:
            self.collective = Counter(payload_bytes=self.comm_bytes)   # its bytes were payload;
            self.comm_bytes = 0.0                                      # wire counts from here on
        if self.optimizers and hasattr(self.optimizers[0], "traffic"):
            self.optimizers[0].traffic.update(st.get("traffic", {}))
        self._sync_fused_lr()

    def last_path(self) -> Optional[Path]:
        """The resumable state to load: last.pt, or this rank's file of the newest step that every
        rank has written (None: there is none)."""
        folder = self.run_dir / CHECKPOINTS
        return last_rank_checkpoint(folder, self.env.rank) if self.env.active else folder / LAST

    def save_last(self) -> None:
        """Save the resumable state (ctrkit/train/checkpoint.py: a multi-rank step counts once
        every rank has written it)."""
        folder = self.run_dir / CHECKPOINTS
        if not self.env.active:
            save_checkpoint(folder / LAST, self.state())
            return
        save_on_every_rank(folder, self.state(), self.env.rank, self.env.world, dist.barrier,
                           fault=lambda where: _injected_fault(self.step, self.env.rank, where))

    # ------------------------------------------------------------------ loop
    def train_step(self, batch) -> torch.Tensor:
        """One step; returns the loss as a tensor (reading it would wait for the GPU)."""
        batch = batch.to(self.device)
        logits = self.model(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        if self.grid:
            from ctrkit.distributed.sharding import average_dense_grads
            average_dense_grads(self.model, self.grid)
        if self.algorithm == "allreduce":
            from ctrkit.optim.allreduce import allreduce_gradients
            sent = allreduce_gradients(self.model, self.env.world)
            self.collective.update(sent)
            self.comm_bytes += sent["wire_bytes"]
        if self.ema:
            self.ema.capture()
        for o in self.optimizers:
            o.step()
        if self.ema:
            self.ema.update()
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        return loss.detach()

    def _lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"]) if self.optimizers else 0.0

    def _evaluate(self, logger: RunLogger) -> bool:
        """Validate, update best/early stopping/plateau, checkpoint; True when training should stop."""
        tc = self.cfg.train
        if "valid" not in self.eval_loaders:
            self.save_last()
            return False
        with self._averaged():
            m, best_state = self._validate()
            value = m["auc"] if self.mode == "max" else m["logloss"]
            better = self.best is None or (value > self.best if self.mode == "max"
                                           else value < self.best)
            if better and not math.isnan(value):
                if self.grid:
                    self._save_sharded_best(best_state)
                elif self.env.is_main:
                    save_checkpoint(self.run_dir / "checkpoints" / BEST, {"model": best_state,
                                                                          "step": self.step})
        logger.log({"step": self.step, "epoch": self.epoch, "samples": self.samples, "split": "valid",
                    "auc": m["auc"], "logloss": m["logloss"], "lr": self._lr(),
                    **{k: v for k, v in self.last_eval.items()}})
        if better and not math.isnan(value):
            self.best, self.best_step, self.bad_evals = value, self.step, 0
        else:
            self.bad_evals += 1
        for s in self.schedulers:
            s.step(value)
        self._sync_fused_lr()
        stop = broadcast_flag(tc.early_stop.enabled and self.bad_evals >= tc.early_stop.patience,
                              self.env)
        self.stopped_early = self.stopped_early or stop
        if not tc.checkpoint_every:   # otherwise checkpoints keep their own schedule
            self.save_last()
        return stop

    def _evaluate_split(self, split: str) -> dict:
        """This rank's model on a split; a sharded model is evaluated by its whole shard group."""
        if self.grid:
            from ctrkit.distributed.sharding import evaluate_sharded
            return evaluate_sharded(self.model, self.schema, split, self.cfg.train.eval_batch_size,
                                    self.grid, self.cfg.train.prefetch)
        return evaluate_split(self.model, self.eval_loaders[split])

    def _save_sharded_best(self, state: dict) -> None:
        """Shard group 0 writes the averaged model as a torch.distributed.checkpoint (loads with
        any shard group size, or into one process: `ctrkit eval`)."""
        from ctrkit.distributed.sharding import save_model
        if self.grid.group != 0:
            return
        mine = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(state)
        path = self.run_dir / "checkpoints" / BEST_SHARDED
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        if self.grid.pos == 0:   # one rank clears leftovers; nobody writes before they are gone
            OwnedFolder(self.run_dir, RUN).record(trees=SHARDED_BEST_TREES)   # (rank 0 only)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier(group=self.grid.shard_pg)
        save_model(self.model, tmp, group=self.grid.shard_pg)
        dist.barrier(group=self.grid.shard_pg)
        if self.grid.pos == 0:   # swap in the complete checkpoint; a crash leaves one of the two
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self.model.load_state_dict(mine)

    def _validate(self) -> tuple:
        """Validation metrics of the model to keep: this process's, or in a multi-rank run the
        network-averaged model's (rank 0 evaluates it, with its shard group when the tables are
        sharded; every rank gets the same numbers)."""
        if not self.env.active:
            return evaluate_split(self.model, self.eval_loaders["valid"]), self.model.state_dict()
        own = self._evaluate_split("valid")
        aucs = gather_floats(own["auc"], self.env)
        net = network_average(self.model, self.env, self.grid)
        vals = [0.0, 0.0]
        if self.env.is_main or (self.grid and self.grid.group == 0):
            mine = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(net["state"])
            avg = self._evaluate_split("valid")
            self.model.load_state_dict(mine)
            vals = [avg["auc"], avg["logloss"]]
        from ctrkit.distributed.runtime import comm_device
        t = torch.tensor(vals, dtype=torch.float64, device=comm_device())
        dist.broadcast(t, src=0)
        steps = max(self.step, 1)
        self.last_eval = {"auc_spread": max(aucs) - min(aucs), "auc_min": min(aucs),
                          "consensus_embedding": net["consensus_embedding"],
                          "consensus_dense": net["consensus_dense"],
                          "bytes_per_worker_step": self.bytes_sent / steps, **self.traffic()}
        return {"auc": float(t[0]), "logloss": float(t[1]), "rows": own["rows"]}, net["state"]

    def _averaged(self):
        """The weights to evaluate and keep: the EMA's while in the block (train.ema_decay)."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()

    def _sync_fused_lr(self) -> None:
        """LR-on-plateau scales fused tables' learning rate by the same factor as the dense one."""
        if not self.optimizers:
            return
        scale = self._lr() / self.cfg.optimizer.dense.lr
        for m in self.model.modules():
            if isinstance(m, FusedEmbeddingBags):
                m.set_learning_rate(self.cfg.optimizer.sparse.lr * scale)

    def _stop_requested(self, signals: StopSignals) -> bool:
        """Whether a signal asked to stop after this step; the ranks of a distributed run agree on
        it every INTERRUPT_POLL steps (one tiny all-reduce)."""
        if not self.env.active:
            return signals.requested
        if self.step % INTERRUPT_POLL:
            return False
        t = torch.tensor([float(signals.requested)], device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def fit(self, logger: RunLogger, signals: Optional[StopSignals] = None) -> None:
        signals = signals or StopSignals()
        tc = self.cfg.train
        steps_per_epoch = len(self.train_loader)
        if steps_per_epoch == 0:
            raise CtrkitError("training split has fewer rows than one batch")
        self.model.train()
        sc = self.cfg.optimizer.schedule
        # The planned length, not max_steps: a run cut short by max_steps and resumed follows the
        # same schedule as one that never stopped.
        sched_total = 0 if (sc.name == "constant" and not sc.warmup_steps) else \
            (sc.total_steps or tc.epochs * steps_per_epoch)
        stop = self.stopped_early or (tc.max_steps and self.step >= tc.max_steps)
        while not stop and self.epoch < tc.epochs:
            self.train_loader.set_position(self.epoch, self.batch_in_epoch)
            bar = tqdm(total=steps_per_epoch, initial=self.batch_in_epoch,
                       disable=not tc.progress or not self.env.is_main,
                       desc=f"epoch {self.epoch + 1}/{tc.epochs}", unit="step", mininterval=1.0,
                       dynamic_ncols=True)
            t_last, n_last, loss_sum, loss_n = time.perf_counter(), self.samples, 0.0, 0
            t_epoch = time.perf_counter()
            evaluated_at = -1
            for batch in self.train_loader:
                if sched_total:
                    apply_schedule(self.optimizers, sc, self.step, sched_total)
                    self._sync_fused_lr()
                loss = self.train_step(batch)
                self.step += 1
                _injected_fault(self.step, self.env.rank)
                self.batch_in_epoch += 1
                self.samples += batch.size
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
                bar.update(1)
                if self.step % tc.log_every == 0:
                    mean_loss = float(loss_sum) / loss_n   # (waits for the device's queue)
                    if not math.isfinite(mean_loss):
                        raise CtrkitError(
                            f"rank {self.env.rank}: training diverged: mean loss {mean_loss} over "
                            f"steps {self.step - loss_n + 1}-{self.step}; lower the learning rate")
                    now = time.perf_counter()
                    sps = (self.samples - n_last) / max(now - t_last, 1e-9)
                    logger.log({"step": self.step, "epoch": self.epoch, "samples": self.samples,
                                "split": "train", "loss": mean_loss, "lr": self._lr(),
                                "samples_per_s": sps, "wall_s": self.train_seconds + now - t_epoch,
                                "bytes_per_worker_step": self.bytes_sent / max(self.step, 1)})
                    bar.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{sps:,.0f}")
                    t_last, n_last, loss_sum, loss_n = now, self.samples, 0.0, 0
                if tc.eval_every and self.step % tc.eval_every == 0:
                    evaluated_at = self.step
                    if self._evaluate(logger):
                        stop = True
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                    self.save_last()
                if tc.max_steps and self.step >= tc.max_steps:
                    stop = True
                if self._stop_requested(signals):
                    bar.close()
                    self.train_seconds += time.perf_counter() - t_epoch
                    self.save_last()
                    raise Interrupted(self.step, self.last_path())
                if stop:
                    break
            bar.close()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)   # the epoch's time includes its queued work
            self.train_seconds += time.perf_counter() - t_epoch
            if self.batch_in_epoch >= steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                if evaluated_at != self.step and self._evaluate(logger):
                    stop = True
                if tc.checkpoint_every and self.step % tc.checkpoint_every:
                    self.save_last()   # (evaluations did not save it)
            elif not (tc.checkpoint_every and self.step % tc.checkpoint_every == 0):
                self.save_last()

    def final_metrics(self) -> dict:
        """Reload the best checkpoint (when validation picked one) and evaluate valid and test."""
        best = self.run_dir / "checkpoints" / BEST
        best_sharded = self.run_dir / "checkpoints" / BEST_SHARDED
        if self.env.active:
            dist.barrier()
        if self.grid and best_sharded.is_dir():
            from ctrkit.distributed.sharding import load_model
            load_model(self.model, best_sharded, group=self.grid.shard_pg)
        elif best.is_file() and not self.grid:
            self.model.load_state_dict(load_checkpoint(best)["model"])
        elif self.env.active:   # no validation split: report the network average
            with self._averaged():
                state = network_average(self.model, self.env, self.grid)["state"]
            self.model.load_state_dict(state)
        elif self.ema:   # no validation split: report the weight average
            self.ema.copy_to()
        out: Dict[str, object] = {}
        if self.env.is_main or (self.grid and self.grid.group == 0):
            for split in self.eval_loaders:
                out[split] = self._evaluate_split(split)
        if self.env.active:
            out.update(self.last_eval)
            from ctrkit.optim.build import split_parameters
            per_rank = (self.model.embedding_bytes_per_rank if self.grid else
                        [sum(p.numel() * p.element_size() for p in split_parameters(self.model)[0])])
            out.update(shard_group_size=self.grid.k if self.grid else 1,
                       embedding_bytes_per_rank=per_rank)
            # bytes_per_worker_step and wire_bytes_per_step: the same, wire bytes (allreduce too)
            out.update(workers=self.env.world, algorithm=self.algorithm,
                       topology=self.topology.describe() if self.topology else None,
                       bytes_per_worker_step=self.bytes_sent / max(self.step, 1),
                       wire_bytes_per_step=self.bytes_sent / max(self.step, 1))
            if self.algorithm == "allreduce":
                out.update(self.traffic())   # + payload_bytes_per_step
        out.update(device=str(self.device),
                   backend=dist.get_backend() if dist.is_initialized() else None)
        out.update(lr_scale={"dense": self.lr_scale[0], "tables": self.lr_scale[1]},
                   samples=self.samples * self.env.world, steps=self.step, epochs=self.epoch,
                   best_step=self.best_step, stopped_early=self.stopped_early,
                   wall_seconds=round(self.train_seconds, 3),
                   samples_per_s=round(self.samples * self.env.world / max(self.train_seconds, 1e-9), 1),
                   model=self.cfg.model.name, run_dir=str(self.run_dir))
        return out


def _check_distributed(cfg: Config) -> None:
    dc = cfg.distributed
    if cfg.optimizer.sparse.fused and dc.algorithm not in ("local",) and dc.workers > 1:
        raise ConfigError("optimizer.sparse.fused updates tables inside backward; algorithm "
                          f"'{dc.algorithm}' needs the gradients (use fused=false)")
    if dc.shard_group_size > 1:
        from ctrkit.distributed.sharding import check_grid
        check_grid(dc.workers, dc.shard_group_size)
        if dc.algorithm not in DECENTRALIZED:
            raise ConfigError(f"distributed.shard_group_size={dc.shard_group_size} needs a "
                              f"decentralized algorithm ({', '.join(DECENTRALIZED)}), not "
                              f"'{dc.algorithm}'")
    if dc.workers > 1 or dc.topology == "edges":
        from ctrkit.comm.topology import build_topology
        try:   # the decentralized workers are the shard groups
            build_topology(dc.topology, dc.workers // dc.shard_group_size, dc.edges)
        except ConfigError as e:
            key = "distributed.edges" if dc.topology == "edges" or dc.edges else "distributed.topology"
            raise ConfigError(f"{key}: {e}") from None


def train(cfg: Config, progress: Optional[bool] = None) -> RunResult:
    """Train the configured model; returns the final metrics (also written to metrics.json).

    With `distributed.workers > 1` this process launches the ranks through torch's elastic
    launcher and returns rank 0's metrics; under torchrun it is one of the ranks.
    """
    if progress is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": progress})})
    tc = cfg.train
    _check_distributed(cfg)
    if cfg.distributed.workers > 1 and not launched_by_torchrun():
        # The launcher holds the data's shared lock and the run folder's lock for its ranks.
        with open_run_dir(cfg) as run_dir, open_prepared(cfg, tc.progress):
            os.environ["CTRKIT_LAUNCHED"] = "1"
            try:
                launch_workers(cfg, run_dir)
            finally:
                os.environ.pop("CTRKIT_LAUNCHED", None)
            return RunResult(read_json(run_dir / "metrics.json"), run_dir, None)
    env = init_distributed(cfg)
    set_threads(tc.threads or (1 if env.active else 0))
    keep_freed_memory()
    try:
        result = _train_rank(cfg, env)
        if env.active:   # nobody tears down its process group while a peer may still talk to it
            dist.barrier()
        return result
    except (RuntimeError, dist.DistError) as e:
        if not env.active or not is_comm_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtrkitError(f"rank {env.rank}: {first} (a peer died, or hung longer than "
                          f"distributed.timeout_s={cfg.distributed.timeout_s:g})") from None
    finally:
        shutdown()


def _injected_fault(step: int, rank: int, where: str = "step") -> None:
    """Test hook for torchrun restarts: CTRKIT_TEST_KILL="RANK:STEP" hard-kills that rank at that
    step of the first attempt (no cleanup, like a lost machine); "RANK:STEP:save" as it starts to
    save its checkpoint of that step, "RANK:STEP:saved" right after it wrote it. CTRKIT_TEST_HANG
    makes the rank stop answering instead (until the launcher's SIGTERM)."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    for var in ("CTRKIT_TEST_KILL", "CTRKIT_TEST_HANG"):   # HANG: SIGSTOP, a rank that hangs
        spec = os.environ.get(var)
        if spec:
            r, s, *at = spec.split(":")
            if (int(r), int(s), at[0] if at else "step") == (rank, step, where):
                if var == "CTRKIT_TEST_HANG":   # answers nobody; dies when the launcher says so
                    signal.signal(signal.SIGTERM, lambda *_: os._exit(17))
                    time.sleep(3600)
                os._exit(17)


def _train_rank(cfg: Config, env: DistEnv) -> RunResult:
    with contextlib.ExitStack() as hold:   # (the folders' locks, held until the run ends)
        if env.is_main:   # (the run folder first: a resume on other data must not re-prepare)
            run_dir = Path(cfg.train.run_dir) if os.environ.get("CTRKIT_LAUNCHED") else \
                hold.enter_context(open_run_dir(cfg))
            schema = hold.enter_context(open_prepared(cfg, cfg.train.progress))
        if env.active:
            dist.barrier()
        if not env.is_main:
            schema = Schema.load(Path(cfg.data.prepared_dir))
            run_dir = Path(cfg.train.run_dir)
        # ranks under a launcher get each signal twice: only a single process stops on the second
        signals = hold.enter_context(StopSignals(hard_after=2 if not env.active else 10 ** 9))
        return _run(cfg, env, schema, run_dir, signals)


def _run(cfg: Config, env: DistEnv, schema: Schema, run_dir: Path,
         signals: StopSignals) -> RunResult:
    tc = cfg.train
    trainer = Trainer(cfg, schema, run_dir, env)
    last = trainer.last_path()
    have = last is not None and last.is_file()
    # After a torchrun restart (distributed.max_restarts) every rank continues from its checkpoint
    # of the newest step all ranks have.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = tc.resume or (restarted and min(gather_floats(float(have), env)) == 1.0)
    if trainer.exchange is not None and not resume:
        check_identical_replicas(trainer.model, env, trainer.grid)
    if resume:
        if not have:
            raise CtrkitError(f"{run_dir}: rank {env.rank} has no checkpoint to resume from "
                              f"({last or CHECKPOINTS + '/last.json'} is missing)")
        trainer.load_state(load_checkpoint(last), last)
    logger = NullLogger()
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        logger = RunLogger(run_dir, tensorboard=tc.tensorboard,
                           resume_step=trainer.step if resume else None)
    try:
        trainer.fit(logger, signals)
        metrics = trainer.final_metrics()
        for split in ("valid", "test"):
            if split in metrics:
                m = metrics[split]
                logger.log({"step": trainer.step, "epoch": trainer.epoch, "samples": trainer.samples,
                            "split": f"final_{split}", "auc": m["auc"], "logloss": m["logloss"]})
    finally:
        logger.close()
    if env.is_main:
        write_json(run_dir / "metrics.json", metrics)
        if tc.plot:
            plot_curves(run_dir)
    return RunResult(metrics, run_dir, trainer.model)


def evaluate(cfg: Config, checkpoint: Optional[str] = None,
             progress: Optional[bool] = None) -> dict:
    """Evaluate a checkpoint (default: the run's best, else last) on valid and test."""
    with open_prepared(cfg, cfg.train.progress if progress is None else progress) as schema:
        return _evaluate_checkpoint(cfg, schema, checkpoint)


def _evaluate_checkpoint(cfg: Config, schema: Schema, checkpoint: Optional[str]) -> dict:
    set_threads(cfg.train.threads)
    from ctrkit.train.device import resolve_device, use_device
    device = resolve_device(cfg.train.device)
    use_device(device)
    run_dir = Path(cfg.train.run_dir)
    path = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / BEST
    for fallback in (BEST_SHARDED, LAST):
        if checkpoint is None and not path.exists():
            path = run_dir / "checkpoints" / fallback
    if not (path.is_file() or (path / ".metadata").is_file()):
        raise CtrkitError(f"{path}: checkpoint not found")
    model = build_training_model(cfg, schema, device)
    try:
        if path.is_dir():   # a sharded run's torch.distributed.checkpoint, loaded whole
            from ctrkit.distributed.sharding import load_model
            load_model(model, path)
        else:
            load_averaged_weights(model, load_checkpoint(path))
    except (RuntimeError, ValueError) as e:
        raise CtrkitError(f"{path}: does not match model '{cfg.model.name}' "
                          f"({_mismatch(e)})") from None
    out: Dict[str, object] = {"checkpoint": str(path), "model": cfg.model.name}
    for split in ("valid", "test"):
        if split in schema.splits:
            out[split] = evaluate_split(model, BatchLoader(schema, split, cfg.train.eval_batch_size,
                                                           prefetch=cfg.train.prefetch,
                                                           pin_memory=device.type == "cuda"))
    _record_eval(_run_of(path, run_dir), cfg, out)
    return out


def _run_of(checkpoint: Path, run_dir: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (None: not inside a ctrkit run folder)."""
    if is_within(checkpoint, run_dir):
        return run_dir
    for parent in list(checkpoint.resolve().parents)[:3]:
        if OwnedFolder(parent, RUN).manifest_kind == RUN:
            return parent
    return None


def _record_eval(run: Optional[Path], cfg: Config, out: dict) -> None:
    """Merge an evaluation into its own run's metrics.json (never another run's, and only when
    it was made on the data that run was trained on)."""
    if run is None or not run.is_dir():
        return
    folder = OwnedFolder(run, RUN)
    if not folder.owned:
        return
    other = resume_conflict(run, cfg)
    if other:
        print(f"ctrkit: {run}/metrics.json not updated: this evaluation's {other}",
              file=sys.stderr, flush=True)
        return
    path_json = run / "metrics.json"
    try:
        with folder.lock(exclusive=True, wait=False):
            merged = read_json(path_json) if path_json.is_file() else {}
            merged.update(out)
            write_json(path_json, merged)
    except CtrkitError as e:
        if "in use by" not in str(e):
            raise
        print(f"ctrkit: {run} is being written by a training run; metrics.json not updated",
              file=sys.stderr, flush=True)
