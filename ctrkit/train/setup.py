"""Everything one rank trains with, built from the config before the loop starts.

`build_components` seeds every generator, then builds in this order: the strategy
(`distributed.algorithm`), the model on the strategy's device and placed by it (sharded in shard
groups), the initial weights (`train.init_from`), the learning rates scaled for the number of
workers (a pure function: the config is not rewritten), the strategy's optimizers, the weight
average (`train.ema_decay`), the LR-on-plateau schedulers, the loaders and the checkpoint manager.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ctrkit.config import Config, base_optimizer_conflict, ema_conflict
from ctrkit.data.loader import BatchLoader
from ctrkit.data.preprocess import open_prepared
from ctrkit.data.schema import Schema
from ctrkit.distributed.runtime import DistEnv
from ctrkit.errors import ConfigError
from ctrkit.models import build_model
from ctrkit.models.fused import fuse_embeddings
from ctrkit.optim.build import LearningRates
from ctrkit.strategies import Strategy, build_strategy
from ctrkit.train.checkpointing import CheckpointManager
from ctrkit.train.ema import WeightEMA
from ctrkit.train.interrupt import injected_fault


@dataclass
class Components:
    model: nn.Module
    strategy: Strategy
    rates: LearningRates
    optimizers: List[torch.optim.Optimizer]
    plateau: List[torch.optim.lr_scheduler.ReduceLROnPlateau]
    ema: Optional[WeightEMA]
    train_loader: BatchLoader
    eval_loaders: Dict[str, BatchLoader]
    checkpoints: CheckpointManager


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    """The same seed on every rank: replicas start identical, as gossip averaging assumes
    (torch.manual_seed seeds the GPUs too)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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
        s = cfg.optimizer.sparse
        fuse_embeddings(model, s.name, s.lr, s.eps, s.weight_decay, device)
    return model.to(device)


def _refuse(problem: Optional[str]) -> None:
    """(a config changed after validation, e.g. by model_copy, lands here)"""
    if problem:
        raise ConfigError(problem)


def build_components(cfg: Config, schema: Schema, run_dir: Path, env: DistEnv) -> Components:
    tc = cfg.train
    seed_everything(tc.seed)
    strategy = build_strategy(cfg, env)
    model = build_training_model(cfg, schema, strategy.model_device)
    strategy.place(model)
    checkpoints = CheckpointManager(run_dir, env, tc.checkpoint_every, strategy.grid,
                                    fault=lambda step, where: injected_fault(step, env.rank, where))
    if tc.init_from:
        checkpoints.init_weights(model, Path(tc.init_from), cfg.model.name)
    _refuse(base_optimizer_conflict(cfg))
    rates = strategy.learning_rates()
    if rates.scale != (1.0, 1.0) and env.rank == 0:
        print(f"ctrkit: {cfg.distributed.lr_scaling} lr scaling for {env.world} workers: dense lr "
              f"x{rates.scale[0]:.3g} ({rates.dense:.3g}), tables x{rates.scale[1]:.3g} "
              f"({rates.tables:.3g})", flush=True)
    optimizers = strategy.build_optimizers(model, rates)
    _refuse(ema_conflict(cfg))
    ema = WeightEMA(model, tc.ema_decay) if tc.ema_decay else None
    pl = tc.lr_plateau
    mode = "max" if tc.early_stop.monitor == "valid_auc" else "min"
    plateau = [torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, mode=mode, factor=pl.factor, patience=pl.patience, min_lr=pl.min_lr)
        for o in optimizers] if pl.enabled else []
    # For a GPU the loader pins batches. It still finds the distinct ids on the host: on the
    # GPU their count is a data-dependent size, i.e. a host sync per step.
    pin = env.device.type == "cuda"
    train_loader = BatchLoader(schema, "train", tc.batch_size, shuffle=tc.shuffle, seed=tc.seed,
                               prefetch=tc.prefetch, rank=env.rank, world_size=env.world,
                               pin_memory=pin)
    eval_loaders = {s: BatchLoader(schema, s, tc.eval_batch_size, prefetch=tc.prefetch,
                                   pin_memory=pin)
                    for s in ("valid", "test") if s in schema.splits}
    return Components(model, strategy, rates, optimizers, plateau, ema, train_loader,
                      eval_loaders, checkpoints)
