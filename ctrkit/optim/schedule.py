"""Learning-rate schedules: linear warmup, then cosine or linear decay to a fraction of the peak.

The schedule rescales every optimizer's groups by f(t) / f(t - 1) before step t, instead of
setting lr = peak * f(t): what LR-on-plateau has cut stays cut, and a resumed run continues from
the learning rates its checkpoint holds.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ctrkit.config import ScheduleConfig


def lr_factor(cfg: ScheduleConfig, step: int, total: int) -> float:
    """f(step): the learning rate of step `step` (0-based) over the configured peak."""
    if step < 0:
        return 1.0
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    p = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    r = cfg.final_ratio
    if cfg.name == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - (1.0 - r) * p


def apply_schedule(optimizers: Iterable[torch.optim.Optimizer], cfg: ScheduleConfig, step: int,
                   total: int) -> None:
    """Move every group's lr from f(step - 1) to f(step) of the schedule (see the module doc)."""
    cur, prev = lr_factor(cfg, step, total), lr_factor(cfg, step - 1, total)
    if cur == prev:   # also past the end of a decay to 0 (prev = 0)
        return
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] *= cur / prev
