"""Row-sparse ("lazy") optimizers for flat embedding weights with sparse COO gradients.

A batch touches a few thousand of millions of rows, so a step must cost O(rows touched): state
(first/second moments, AMSGrad max, Adagrad sums) is read and written only on the rows the batch
used, for *all* tables at once (they share one flat weight), with the moments of a row stored side by
side so one gather and one scatter move them all. Weight decay applies to touched rows only. Bias
correction uses the global step, as TensorFlow's LazyAdam does.
"""
from __future__ import annotations

import math
from typing import Iterable, Tuple

import torch
from torch.optim import Optimizer


def rows_and_grads(grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unique touched rows and their summed gradient rows (a copy, safe to modify).

    A dense gradient (torchrec's non-fused sharded kernel) gives its nonzero rows: O(rows) per
    step, which is why unsharded tables use `BatchedEmbeddingBags`' sparse gradients instead."""
    if not grad.is_sparse:
        if grad.dim() != 2:
            raise RuntimeError("row-sparse optimizers need sparse or 2-D gradients (see "
                               "BatchedEmbeddingBags)")
        rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
        return rows, grad.index_select(0, rows)
    if grad.is_coalesced():
        return grad._indices()[0], grad._values().clone()
    idx, vals = grad._indices()[0], grad._values()
    rows, inverse = torch.unique(idx, return_inverse=True)
    return rows, vals.new_zeros(rows.numel(), vals.shape[1]).index_add_(0, inverse, vals)


def add_rows_(p: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor, alpha: float = 1.0) -> None:
    """p[rows] += alpha * delta for *distinct* rows: gather, add, scatter back.

    On CPU `index_add_` runs serially and took 3-4x as long as this for 60k rows of width 16."""
    p.index_copy_(0, rows, p.index_select(0, rows).add_(delta, alpha=alpha))


class _RowSparseOptimizer(Optimizer):
    """Shared loop: per parameter, the touched rows and their (weight-decayed) gradient rows."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, g = rows_and_grads(p.grad)
                if group["weight_decay"]:
                    g.add_(p.index_select(0, rows), alpha=group["weight_decay"])
                self._update(p, group, self.state[p], rows, g)
        return None

    def _update(self, p: torch.Tensor, group: dict, state: dict, rows: torch.Tensor,
                g: torch.Tensor) -> None:
        raise NotImplementedError


class RowSparseAdam(_RowSparseOptimizer):
    """Lazy Adam / AMSGrad over touched rows; `rowwise=True` keeps one second moment per row.

    State `moments` is [rows, D + Dv (+ Dv for AMSGrad)]: m, v and max(v) of a row side by side.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, rowwise: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, rowwise=rowwise))

    def _update(self, p, group, state, rows, g) -> None:
        b1, b2 = group["betas"]
        d = p.shape[1]
        dv = 1 if group["rowwise"] else d
        if not state:
            state["step"] = torch.zeros((), dtype=torch.int64)   # host: read as a Python int
            width = d + dv * (2 if group["amsgrad"] else 1)
            state["moments"] = torch.zeros(p.shape[0], width, dtype=p.dtype, device=p.device)
        state["step"] += 1
        t = int(state["step"])
        mom = state["moments"].index_select(0, rows)
        m, v = mom[:, :d], mom[:, d:d + dv]
        m.mul_(b1).add_(g, alpha=1 - b1)
        g2 = g.square_()
        v.mul_(b2).add_(g2.mean(dim=1, keepdim=True) if group["rowwise"] else g2, alpha=1 - b2)
        if group["amsgrad"]:
            vmax = mom[:, d + dv:]
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        state["moments"].index_copy_(0, rows, mom)
        step_size = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        denom = v.sqrt().add_(group["eps"] * math.sqrt(1 - b2 ** t))
        add_rows_(p, rows, m.div_(denom), alpha=-step_size)


class RowSparseAdagrad(_RowSparseOptimizer):
    """Lazy Adagrad over touched rows (`rowwise=True`: one accumulator per row, as fbgemm's)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 0.01, eps: float = 1e-8,
                 weight_decay: float = 0.0, rowwise: bool = True) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, rowwise=rowwise))

    def _update(self, p, group, state, rows, g) -> None:
        if not state:
            shape = (p.shape[0], 1) if group["rowwise"] else p.shape
            state["sum"] = torch.zeros(shape, dtype=p.dtype, device=p.device)
        g2 = g.square()
        s = state["sum"].index_select(0, rows).add_(
            g2.mean(dim=1, keepdim=True) if group["rowwise"] else g2)
        state["sum"].index_copy_(0, rows, s)
        add_rows_(p, rows, g.div_(s.sqrt_().add_(group["eps"])), alpha=-group["lr"])


class RowSparseSGD(_RowSparseOptimizer):
    """Plain SGD on touched rows (weight decay on touched rows only)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 0.01,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def _update(self, p, group, state, rows, g) -> None:
        add_rows_(p, rows, g, alpha=-group["lr"])
