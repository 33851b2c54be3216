"""Exponential moving average (EMA) of the weights, evaluated and exported instead of the last step.

The last iterate of a short run is noisy; the average of the last ~1 / (1 - decay) steps'
weights (decay 0.95: about 20) is less so, and evaluates better after one epoch on the reference
data (bench/results/one_epoch/cpu_2026-11-26.json: `last_step_weights` against `ema_0.95`, the
same seeds). It is off by default and on in configs/deepfm_criteo_like.yaml. A dense average
would touch every embedding row every step, which breaks "a step costs O(rows touched)", so
table rows are averaged lazily and exactly:

    a step leaves an untouched row's weight w unchanged, so k steps of the average are
    ema <- d^k ema + (1 - d^k) w in closed form. Each row remembers the step it was last brought
    up to date; a step brings only its touched rows up to date (with their weight before the
    step), and reading the average brings all rows up to date.

The average starts at zero and is read with Adam's bias correction (divided by 1 - d^t), so it is
the weighted mean of the iterates after steps 1..t only, at any t, whatever the initial weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch
from torch import nn

from ctrkit.optim.build import split_parameters


class WeightEMA:
    """EMA of a model's parameters: dense ones every step, embedding-table rows lazily.

    Call `capture()` after the gradients are final and before the optimizer step (it reads the
    touched rows from the tables' row-sparse gradients and their weights before the step), then
    `update()` after the step. `applied()` swaps the average into the model for evaluation or
    export. Buffers (batch norm statistics) are the model's own, already running averages."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.step = 0
        self.tables, self.dense = split_parameters(model)
        self.table_avg = [torch.zeros_like(p, requires_grad=False) for p in self.tables]
        # step up to which each row's average is current (int32: 2^31 steps is plenty)
        self.table_last = [torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
                           for p in self.tables]
        self.dense_avg = [torch.zeros_like(p, requires_grad=False) for p in self.dense]
        self._pending: List[Optional[tuple]] = []

    @torch.no_grad()
    def capture(self) -> None:
        """Remember each table's touched rows and their weights before the optimizer step."""
        self._pending = []
        for p in self.tables:
            g = p.grad
            if g is None:
                self._pending.append(None)
                continue
            if not g.is_sparse:
                raise RuntimeError("WeightEMA needs row-sparse table gradients")
            rows = (g if g.is_coalesced() else g.coalesce())._indices()[0]
            self._pending.append((rows, p.detach().index_select(0, rows)))

    @torch.no_grad()
    def update(self) -> None:
        """Advance the average by one step (after the optimizer step)."""
        self.step += 1
        t, d = self.step, self.decay
        for p, avg, last, pend in zip(self.tables, self.table_avg, self.table_last,
                                      self._pending or [None] * len(self.tables)):
            if pend is None:
                continue
            rows, before = pend
            # steps last+1..t-1 saw `before`, step t sees the new weight:
            # ema_t = d^(t-s) ema_s + (d - d^(t-s)) before + (1 - d) after
            dk = torch.pow(d, (t - last.index_select(0, rows)).to(avg.dtype)).unsqueeze(1)
            new = avg.index_select(0, rows).mul_(dk).add_(before.mul_(d - dk))
            new.add_(p.detach().index_select(0, rows), alpha=1 - d)
            avg.index_copy_(0, rows, new)
            last.index_fill_(0, rows, t)
        self._pending = []
        if self.dense:
            torch._foreach_lerp_(self.dense_avg, [p.detach() for p in self.dense], 1 - d)

    @torch.no_grad()
    def _sync_all(self) -> None:
        """Bring every row up to the current step (O(table): only when the average is read)."""
        t, d = self.step, self.decay
        for p, avg, last in zip(self.tables, self.table_avg, self.table_last):
            dk = torch.pow(d, (t - last).to(avg.dtype)).unsqueeze(1)
            w = p.detach()
            avg.sub_(w).mul_(dk).add_(w)   # d^k avg + (1 - d^k) w, without a table-sized temporary
            last.fill_(t)

    @torch.no_grad()
    def copy_to(self) -> None:
        """Write the (bias-corrected) average into the model's parameters; before any step the
        model keeps its own weights."""
        if self.step == 0:
            return
        self._sync_all()
        scale = 1.0 / (1.0 - self.decay ** self.step)
        for p, avg in zip(self.tables + self.dense, self.table_avg + self.dense_avg):
            p.copy_(avg).mul_(scale)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights, after it its own again."""
        params = self.tables + self.dense
        saved = [p.detach().clone() for p in params] if self.step else []
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "step": self.step, "tables": self.table_avg,
                "last": self.table_last, "dense": self.dense_avg}

    def load_state_dict(self, state: dict) -> None:
        if len(state["tables"]) != len(self.table_avg) or len(state["dense"]) != len(self.dense_avg):
            raise ValueError("EMA state does not match the model")
        self.step = int(state["step"])
        with torch.no_grad():
            for dst, src in zip(self.table_avg + self.dense_avg + self.table_last,
                                state["tables"] + state["dense"] + state["last"]):
                dst.copy_(src)


def load_averaged_weights(model: nn.Module, checkpoint: dict) -> None:
    """Load a checkpoint's weights into `model`: its weight average where it holds one (a
    `last.pt` of a run with train.ema_decay), so eval and init_from see what the run evaluated."""
    model.load_state_dict(checkpoint["model"])
    st = checkpoint.get("ema")
    if not st:
        return
    ema = WeightEMA(model, st["decay"])
    ema.load_state_dict(st)
    ema.copy_to()
