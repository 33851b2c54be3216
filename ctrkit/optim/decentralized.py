"""Decentralized optimizers: every worker keeps a replica and averages only with its neighbours.

- `dpsgd`: local SGD step, then gossip of the parameters.
- `damsgrad`: decentralized AMSGrad with a gossiped second-moment tracker u (DESIGN.md):
      m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2 ;  vhat_new = max(vhat, v)
      x <- sum_j W_ij x_j ;  u <- sum_j W_ij u_j                    (gossip)
      u <- u + vhat_new - vhat ;  vhat <- vhat_new ;  x <- x - lr * m / sqrt(max(u, eps))
  u tracks the network average of vhat, so all workers take the same adaptive step. The tracker
  correction comes before the step (DESIGN.md lists it after): otherwise a row's first step divides
  by sqrt(eps), because its tracker does not yet hold the worker's own second moment, and the
  embeddings blow up (seen: logloss 7.9 after 10 steps).

Dense parameters (and their u) travel as one packed buffer per neighbour and step. Embedding tables
are row-sparse: moments change only on touched rows, and table gossip uses public copies (x_hat,
known to the neighbours, and s = sum_j W_ij x_hat_j): only rows where x - x_hat != 0 travel, and
with the identity compressor and step 1 this is exactly x <- sum_j W_ij x_j.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import Topology
from ctrkit.optim.build import split_parameters
from ctrkit.optim.sparse import add_rows_, rows_and_grads


class RowGossip:
    """Exact gossip of a row-sparse table through public copies; state lives in `state`."""

    def __init__(self, table: torch.Tensor, state: dict, prefix: str) -> None:
        self.x, self.st, self.p = table, state, prefix
        if prefix + "hat" not in state:
            state[prefix + "hat"] = table.detach().clone()   # replicas start identical, so
            state[prefix + "sum"] = table.detach().clone()   # s = sum_j W_ij x_hat_j = x_hat
            state[prefix + "dirty"] = torch.zeros(0, dtype=torch.int64)

    def mark(self, rows: torch.Tensor) -> None:
        self.st[self.p + "dirty"] = torch.cat([self.st[self.p + "dirty"].to(torch.int64), rows])

    def step(self, exchange: NeighborExchange, topo: Topology, rank: int) -> None:
        xhat, s = self.st[self.p + "hat"], self.st[self.p + "sum"]
        # (Optimizer.load_state_dict casts every state tensor to the parameter's dtype.)
        rows = torch.unique(self.st[self.p + "dirty"].to(torch.int64))
        q = self.x.index_select(0, rows) - xhat.index_select(0, rows)
        keep = q.ne(0).flatten(1).any(dim=1)
        rows, q = rows[keep], q[keep]
        got = exchange.rows(rows, q)
        add_rows_(xhat, rows, q)
        add_rows_(s, rows, q, alpha=topo.self_weight(rank))
        changed = [rows]
        for j, w in topo.neighbor_weights(rank).items():
            r, v = got[j]
            add_rows_(s, r, v.view((-1,) + tuple(s.shape[1:])), alpha=w)
            changed.append(r)
        ch = torch.unique(torch.cat(changed))
        self.x.index_copy_(0, ch, s.index_select(0, ch))
        self.st[self.p + "dirty"] = ch


class DecentralizedOptimizer(Optimizer):
    """`dpsgd` or `damsgrad` over a model's dense parameters and row-sparse tables."""

    def __init__(self, model: nn.Module, algorithm: str, topo: Topology, rank: int,
                 exchange: NeighborExchange, dense_lr: float, sparse_lr: float,
                 betas=(0.9, 0.999), eps: float = 1e-8, rowwise: bool = False) -> None:
        sparse, dense = split_parameters(model)
        groups = [g for g in ({"params": dense, "lr": dense_lr, "sparse": False},
                              {"params": sparse, "lr": sparse_lr, "sparse": True}) if g["params"]]
        super().__init__(groups, dict(betas=tuple(betas), eps=eps, rowwise=rowwise))
        if algorithm not in ("dpsgd", "damsgrad"):
            raise ValueError(f"unknown decentralized algorithm {algorithm}")
        self.algorithm, self.topo, self.rank, self.exchange = algorithm, topo, rank, exchange
        self.adaptive = algorithm == "damsgrad"

    # ------------------------------------------------------------------ dense part
    def _dense_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if self.adaptive and not st:
            for k in ("m", "v", "vhat", "u"):
                st[k] = torch.zeros_like(p)
        return st

    def _dense_step(self, group: dict) -> None:
        params = [p for p in group["params"]]
        b1, b2 = group["betas"]
        vhat_new = []
        for p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if self.adaptive:
                st = self._dense_state(p)
                st["m"].mul_(b1).add_(g, alpha=1 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                vhat_new.append(torch.maximum(st["vhat"], st["v"]))
            else:
                p.data.add_(g, alpha=-group["lr"])
        # gossip x (and u): one packed buffer per neighbour
        parts = [p.data.reshape(-1) for p in params]
        if self.adaptive:
            parts += [self.state[p]["u"].reshape(-1) for p in params]
        flat = torch.cat(parts)
        got = self.exchange.dense(flat)
        mixed = flat * self.topo.self_weight(self.rank)
        for j, w in self.topo.neighbor_weights(self.rank).items():
            mixed.add_(got[j], alpha=w)
        off = 0
        for p in params:
            n = p.numel()
            p.data.copy_(mixed[off:off + n].view_as(p))
            off += n
        if not self.adaptive:
            return
        for p, vn in zip(params, vhat_new):
            st = self.state[p]
            n = p.numel()
            st["u"].copy_(mixed[off:off + n].view_as(p))
            off += n
            st["u"].add_(vn - st["vhat"])
            st["vhat"].copy_(vn)
            p.data.addcdiv_(st["m"], st["u"].clamp(min=group["eps"]).sqrt(), value=-group["lr"])

    # ------------------------------------------------------------------ tables
    def _table_step(self, group: dict) -> None:
        b1, b2 = group["betas"]
        for p in group["params"]:
            st = self.state[p]
            d = p.shape[1]
            dv = 1 if group["rowwise"] else d
            if self.adaptive and "m" not in st:
                st["m"] = torch.zeros_like(p)
                for k in ("v", "vhat", "u"):
                    st[k] = torch.zeros(p.shape[0], dv, dtype=p.dtype)
            xg = RowGossip(p.data, st, "x")
            ug = RowGossip(st["u"], st, "u") if self.adaptive else None
            rows = g = None
            if p.grad is not None:
                rows, g = rows_and_grads(p.grad)
            if self.adaptive and rows is not None:
                m = st["m"].index_select(0, rows).mul_(b1).add_(g, alpha=1 - b1)
                g2 = g.square()
                if group["rowwise"]:
                    g2 = g2.mean(dim=1, keepdim=True)
                v = st["v"].index_select(0, rows).mul_(b2).add_(g2, alpha=1 - b2)
                st["m"].index_copy_(0, rows, m)
                st["v"].index_copy_(0, rows, v)
                vhat_old = st["vhat"].index_select(0, rows)
                vhat_new = torch.maximum(vhat_old, v)
            elif rows is not None:   # dpsgd: local SGD step on touched rows, before gossip
                add_rows_(p.data, rows, g, alpha=-group["lr"])
                xg.mark(rows)
            xg.step(self.exchange, self.topo, self.rank)
            if ug is not None:
                ug.step(self.exchange, self.topo, self.rank)
            if self.adaptive and rows is not None:
                add_rows_(st["u"], rows, vhat_new - vhat_old)
                st["vhat"].index_copy_(0, rows, vhat_new)
                u = st["u"].index_select(0, rows).clamp(min=group["eps"]).sqrt()
                add_rows_(p.data, rows, m / u, alpha=-group["lr"])
                xg.mark(rows)
                ug.mark(rows)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            if group["sparse"]:
                self._table_step(group)
            else:
                self._dense_step(group)
        return None


def average_gradients(model: nn.Module, world: int) -> int:
    """The `allreduce` reference: average dense gradients (all_reduce) and row-sparse table
    gradients (all_gather of row ids and rows, padded to the largest). Returns bytes sent."""
    import torch.distributed as dist
    sparse, dense = split_parameters(model)
    sent = 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in dense]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        sent += flat.numel() * 4
        off = 0
        for p, g in zip(dense, grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n
    for p in sparse:
        if p.grad is None:
            rows = torch.zeros(0, dtype=torch.int64)
            vals = torch.zeros(0, p.shape[1])
        else:
            rows, vals = rows_and_grads(p.grad)
        n = torch.tensor([rows.numel()])
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, n)
        top = max(1, int(max(s.item() for s in sizes)))
        pr = torch.full((top,), -1, dtype=torch.int64)
        pr[:rows.numel()] = rows
        pv = torch.zeros(top, p.shape[1])
        pv[:rows.numel()] = vals
        all_r = [torch.empty_like(pr) for _ in range(world)]
        all_v = [torch.empty_like(pv) for _ in range(world)]
        dist.all_gather(all_r, pr)
        dist.all_gather(all_v, pv)
        sent += top * (8 + 4 * p.shape[1])
        r = torch.cat([a[:int(s)] for a, s in zip(all_r, sizes)])
        v = torch.cat([a[:int(s)] for a, s in zip(all_v, sizes)]) / world
        p.grad = torch.sparse_coo_tensor(r.unsqueeze(0), v, p.shape).coalesce()
    return sent
