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
- `choco`: the same adaptive step, with the gossip done by CHOCO's compressed public copies:
      q = C(x - x_hat) to the neighbours ; x_hat += q ; s += sum_j W_ij q_j ; x += gamma (s - x_hat)
  What C leaves out stays in x - x_hat and goes out later (error feedback). With the identity
  compressor and gamma = 1 this is exactly the `damsgrad` gossip (tested). The tracker u goes
  through the same compressed gossip, or exactly every `tracker_every` steps.

Dense parameters travel as one flat vector per neighbour and step (with `gossip_tol` > 0 and no
compressor: by blocks, under the tables' tolerance rule). Embedding tables are row-sparse:
moments change only on touched rows, and table gossip always uses public copies (x_hat, known to
the neighbours, and s = sum_j W_ij x_hat_j), so only rows where x - x_hat != 0 travel: rows no
worker touched cost nothing.
"""
from __future__ import annotations

from collections import Counter
from typing import List, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from ctrkit.comm.compress import (Compressor, build_compressor, exact_rows_bytes, unpack_dense,
                                  unpack_rows)
from ctrkit.comm.device import comm_device
from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import Topology
from ctrkit.errors import ConfigError
from ctrkit.optim.build import split_parameters
from ctrkit.optim.sparse import add_rows_, rows_and_grads

ALGORITHMS = ("dpsgd", "damsgrad", "choco")
# Entries per block when an exact-gossip dense vector travels by blocks (gossip_tol > 0): a
# block's id (4 bytes) costs 0.4 % of its 1 KiB of values.
DENSE_BLOCK = 256


def _seed(step: int, rank: int, slot: int, group_size: int = 1) -> int:
    """Seed of one message, known to its receivers (random-k indices are never sent). It is the
    worker's, not the rank's: the `group_size` ranks of a shard group round their one replicated
    dense vector alike, so the group's copies stay equal."""
    worker = rank // group_size
    return (step * 1_000_003 + worker) * 4096 + slot   # slots: 0-1 dense, 2 + 2i / 3 + 2i table i


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Row norms of a [K, D] tensor, in float64."""
    return t.double().norm(dim=1)


class RowGossip:
    """Gossip of a row-sparse table through public copies; its state lives in `state`.

    `compressor` None sends the rows exactly (fp32 values); otherwise C(x - x_hat) of the rows that
    differ is sent and the rest stays behind as error feedback. `gamma` is CHOCO's consensus step.

    Which rows travel (`tol`, the config's `distributed.gossip_tol`): a candidate row (touched,
    received, or with an unsent residual) is sent when |x - x_hat| > tol |x| (row norms); below
    that its difference stays in x - x_hat. After the consensus step a row whose residual and
    step are both at most tol |x| leaves the candidate set until it is touched or received again.
    So a row travels while it is still moving and stops when it has settled, and traffic after
    training decays to nothing. The price is a tolerance: a settled row skips consensus steps of
    at most tol |x| each, so replicas agree and the network mean is kept to about tol |x| (tested:
    tests/test_gossip_reference.py). tol = 0 is the exact algorithm (every row that differs at
    all, every round).

    x_hat and s = sum_j W_ij x_hat_j are float64: in float32 the running sum s drifts from the
    sum of the public copies by ~1e-8 per round, and that error leaks into x through the
    consensus step.
    """

    def __init__(self, table: torch.Tensor, state: dict, prefix: str,
                 compressor: Optional[Compressor] = None, gamma: float = 1.0,
                 tol: float = 0.0, kind: str = "embedding") -> None:
        """`kind` names the traffic counters (`embedding_*_bytes`, or `dense_*` for the blocks
        of a dense vector: DecentralizedOptimizer._dense_blocks)."""
        self.x, self.st, self.p = table, state, prefix
        self.compressor, self.gamma, self.tol, self.kind = compressor, gamma, tol, kind
        if prefix + "hat" not in state:
            state[prefix + "hat"] = table.detach().double()   # replicas start identical, so
            state[prefix + "sum"] = table.detach().double()   # s = sum_j W_ij x_hat_j = x_hat
            # int64 row ids; DecentralizedOptimizer.load_state_dict restores them uncast.
            state[prefix + "dirty"] = torch.zeros(0, dtype=torch.int64, device=table.device)

    def mark(self, rows: torch.Tensor) -> None:
        self.st[self.p + "dirty"] = torch.cat([self.st[self.p + "dirty"], rows])

    def _send(self, rows: torch.Tensor, q: torch.Tensor, exchange: NeighborExchange, n: int,
              seed_of, traffic: Counter):
        """Send C(q) of `rows`: (what the receivers decode of ours: rows, values; theirs by
        neighbour: {j: (rows, values)}; our rows that decoded to nothing)."""
        d = q.shape[1]
        if self.compressor is None:
            got = exchange.rows(rows, q)
            id_bytes = torch.empty(0, dtype=exchange.id_dtype).element_size() * rows.numel()
            traffic[self.kind + "_index_bytes"] += (8 + id_bytes + (4 if rows.numel() == 0 else 0)) * len(got)
            traffic[self.kind + "_payload_bytes"] += 4 * q.numel() * len(got)
            return rows, q, got, None
        # The coders work on host memory (numpy bit packing); a GPU table's rows go through it.
        dev = self.x.device
        packed, sent_rows, sent = self.compressor.roundtrip_rows(rows.cpu(), q.cpu(), n, seed_of(None))
        sent_rows, sent = sent_rows.to(dev), sent.to(dev)
        blobs = exchange.blobs(packed.data, "compressed rows")
        got = {j: tuple(t.to(dev) for t in unpack_rows(b, self.compressor, d, n, seed_of(j)))
               for j, b in blobs.items()}
        traffic[self.kind + "_index_bytes"] += (8 + packed.index_bytes) * len(got)
        traffic[self.kind + "_payload_bytes"] += packed.payload_bytes * len(got)
        # A residual below the coder's resolution decodes to zero and would be re-sent forever
        # (e.g. fp16 underflow): such rows may settle even though their residual is not small.
        return sent_rows, sent, got, sent_rows[sent.eq(0).all(dim=1)]

    def step(self, exchange: NeighborExchange, topo: Topology, rank: int, step: int, slot: int,
             traffic: Counter, group_size: int = 1) -> None:
        xhat, s = self.st[self.p + "hat"], self.st[self.p + "sum"]
        n, d = xhat.shape
        cand = torch.unique(self.st[self.p + "dirty"])
        xc = self.x.index_select(0, cand)
        q = xc.double() - xhat.index_select(0, cand)
        qn = _norms(q)
        keep = qn > self.tol * _norms(xc) if self.tol else qn > 0
        rows, q = cand[keep], q[keep].float()   # what is left of q in float64 stays in x - x_hat
        traffic["exact_bytes"] += exact_rows_bytes(rows.numel(), d, n) * len(topo.neighbors[rank])
        seed_of = lambda j: _seed(step, rank if j is None else j, slot, group_size)   # noqa: E731
        sent_rows, sent, got, undecodable = self._send(rows, q, exchange, n, seed_of, traffic)
        sent = sent.double()
        add_rows_(xhat, sent_rows, sent)
        add_rows_(s, sent_rows, sent, alpha=topo.self_weight(rank))
        changed = [cand]   # CHOCO's consensus step reaches every candidate row, sent or not
        for j, w in topo.neighbor_weights(rank).items():
            r, v = got[j]
            add_rows_(s, r, v.view(-1, d).double(), alpha=w)
            changed.append(r)
        ch = torch.unique(torch.cat(changed))
        hat = xhat.index_select(0, ch)
        move = (s.index_select(0, ch) - hat).mul_(self.gamma)
        new = self.x.index_select(0, ch).double().add_(move)
        self.x.index_copy_(0, ch, new.to(self.x.dtype))
        # Still a candidate: a row with a residual to send or a consensus step still moving it.
        limit = self.tol * _norms(new)
        moving = _norms(move) > limit
        active = moving | (_norms(new - hat) > limit)
        if undecodable is not None and undecodable.numel():
            active &= ~(torch.isin(ch, undecodable) & ~moving)
        self.st[self.p + "dirty"] = ch[active]


class DenseGossip:
    """CHOCO gossip of a flat vector (all dense parameters, or their trackers) via public copies,
    kept in float64 as RowGossip's are."""

    def __init__(self, state: dict, prefix: str, init: torch.Tensor, compressor: Compressor,
                 gamma: float) -> None:
        self.st, self.p, self.compressor, self.gamma = state, prefix, compressor, gamma
        if prefix + "hat" not in state:
            state[prefix + "hat"] = init.double()
            state[prefix + "sum"] = init.double()

    def step(self, flat: torch.Tensor, exchange: NeighborExchange, topo: Topology, rank: int,
             step: int, slot: int, traffic: Counter, group_size: int = 1) -> torch.Tensor:
        xhat, s = self.st[self.p + "hat"], self.st[self.p + "sum"]
        packed, sent = self.compressor.roundtrip_dense((flat.double() - xhat).float().cpu(),
                                                       _seed(step, rank, slot, group_size))
        sent = sent.to(flat.device).double()   # (the coders work on host memory)
        blobs = exchange.blobs(packed.data, "compressed dense")
        k = len(blobs)
        traffic["exact_bytes"] += 4 * flat.numel() * k
        traffic["dense_index_bytes"] += (8 + packed.index_bytes) * k
        traffic["dense_payload_bytes"] += packed.payload_bytes * k
        xhat.add_(sent)
        s.add_(sent, alpha=topo.self_weight(rank))
        for j, w in topo.neighbor_weights(rank).items():
            s.add_(unpack_dense(blobs[j], self.compressor, flat.numel(),
                                _seed(step, j, slot, group_size)).to(flat.device).double(), alpha=w)
        return (flat.double() + self.gamma * (s - xhat)).to(flat.dtype)


def choco_options(cfg, model: nn.Module) -> dict:
    """The `choco` keyword arguments of `DecentralizedOptimizer` from a config; checks that the
    compressors apply to this model's tables and dense vector (at start, not mid-run)."""
    dc = cfg.distributed
    if dc.algorithm != "choco":
        return {}
    comp = build_compressor(dc.compressor)
    dense_comp = build_compressor(dc.dense_compressor or dc.compressor)
    sparse, dense = split_parameters(model)
    try:
        for p in sparse:
            comp.check("rows", p.shape[1])
        if dense:
            dense_comp.check("dense", sum(p.numel() for p in dense))
    except ValueError as e:
        raise ConfigError(f"distributed.compressor: {e}") from None
    return dict(compressor=comp, dense_compressor=dense_comp, gamma=dc.gamma, tracker=dc.tracker,
                tracker_every=dc.tracker_every)


class DecentralizedOptimizer(Optimizer):
    """`dpsgd`, `damsgrad` or `choco` over a model's dense parameters and row-sparse tables."""

    def __init__(self, model: nn.Module, algorithm: str, topo: Topology, rank: int,
                 exchange: NeighborExchange, dense_lr: float, sparse_lr: float,
                 betas=(0.9, 0.999), eps: float = 1e-16, rowwise: bool = False,
                 bias_correction: bool = False, compressor: Optional[Compressor] = None,
                 dense_compressor: Optional[Compressor] = None, gamma: float = 1.0,
                 tracker: str = "compressed", tracker_every: int = 1, group_size: int = 1,
                 gossip_tol: float = 0.0) -> None:
        """`topo` is over ranks; `group_size` ranks (a shard group) form one worker; `gossip_tol`
        is RowGossip's `tol` for the tables (0: exact)."""
        sparse, dense = split_parameters(model)
        groups = [g for g in ({"params": dense, "lr": dense_lr, "sparse": False},
                              {"params": sparse, "lr": sparse_lr, "sparse": True}) if g["params"]]
        super().__init__(groups, dict(betas=tuple(betas), eps=eps, rowwise=rowwise,
                                      bias_correction=bias_correction))
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown decentralized algorithm {algorithm}")
        if algorithm == "choco" and compressor is None:
            raise ValueError("choco needs a compressor")
        self.algorithm, self.topo, self.rank, self.exchange = algorithm, topo, rank, exchange
        self.group_size, self.gossip_tol = group_size, gossip_tol
        self.adaptive = algorithm in ("damsgrad", "choco")
        self.compressor = compressor if algorithm == "choco" else None
        self.dense_compressor = (dense_compressor or compressor) if algorithm == "choco" else None
        self.gamma = gamma if algorithm == "choco" else 1.0
        self.tracker, self.tracker_every = tracker, max(1, tracker_every)
        # A lossy tracker is only an estimate of the network mean of vhat, which is at least
        # vhat_i / n: steps divide by sqrt(max(u, vhat / n, eps)), never more than sqrt(n) times a
        # local AMSGrad step. (Exact gossip needs no such bound, and damsgrad keeps DESIGN.md's.)
        # A gossip tolerance makes the tracker lossy too: a settled block or row skips consensus
        # steps of up to tol of its norm, and its small entries can be off by more than
        # themselves, even below zero (seen: damsgrad n = 8, tol 0.03, diverged at step 20).
        lossy = lambda c: c is not None and c.name != "identity"   # noqa: E731
        self.tracker_bound = (group_size / topo.n if self.adaptive and (
            (tracker == "compressed" and (lossy(self.compressor) or lossy(self.dense_compressor)))
            or gossip_tol > 0) else 0.0)
        self.traffic: Counter = Counter()
        # Without neighbours (one worker, or allreduce's local AMSGrad step) gossip is the
        # identity: s = x_hat, so x never moves. It is skipped, with its public copies (two
        # float64 copies of every table and tracker): the same step, bit for bit.
        self.alone = not topo.neighbors[rank]

    def _step_count(self) -> int:
        """Gossip round counter (in the state so that a resumed run draws the same seeds)."""
        first = self.param_groups[0]["params"][0]
        return int(self.state[first].get("gossip_step", 0))   # a Python int: never dtype-cast

    def _tracker_gossip(self, compressor: Optional[Compressor], t: int) -> Optional[str]:
        """How the second-moment tracker u travels in round t: "compressed" (with the
        parameters' compressor), "exact", or None (an exact-tracker run between its rounds)."""
        if compressor is not None and self.tracker == "compressed":
            return "compressed"
        if compressor is None or (t + 1) % self.tracker_every == 0:
            return "exact"
        return None

    @staticmethod
    def _step_size(group: dict, t: int) -> float:
        """lr, times Adam's bias correction at global step t + 1 when asked for."""
        if not group.get("bias_correction"):
            return group["lr"]
        b1, b2 = group["betas"]
        return group["lr"] * (1 - b2 ** (t + 1)) ** 0.5 / (1 - b1 ** (t + 1))

    # ------------------------------------------------------------------ dense part
    def _dense_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if self.adaptive and "m" not in st:
            for k in ("m", "v", "vhat", "u"):
                st[k] = torch.zeros_like(p)
        return st

    def _mix(self, flat: torch.Tensor) -> torch.Tensor:
        """Exact gossip of a flat vector: sum_j W_ij x_j, one buffer per neighbour."""
        got = self.exchange.dense(flat)
        self.traffic["dense_payload_bytes"] += 4 * flat.numel() * len(got)
        self.traffic["exact_bytes"] += 4 * flat.numel() * len(got)
        mixed = flat * self.topo.self_weight(self.rank)
        for j, w in self.topo.neighbor_weights(self.rank).items():
            mixed.add_(got[j], alpha=w)
        return mixed

    def _dense_blocks(self, holder: dict, prefix: str, flat: torch.Tensor, t: int) -> torch.Tensor:
        """Gossip of a flat vector with the tables' tolerance rule (RowGossip, tol = gossip_tol),
        the vector cut into blocks of DENSE_BLOCK entries (the last one zero-padded): a block
        travels while it moves by more than tol of its norm. The blocks the local step changed
        since the last round (the vector differs from what that round left, `<prefix>seen`) are
        touched, as a table's rows are by their gradient; untouched settled blocks stay out, so
        traffic stops when training does."""
        nb = -(-flat.numel() // DENSE_BLOCK)
        table = torch.zeros(nb * DENSE_BLOCK, dtype=flat.dtype, device=flat.device)
        table[:flat.numel()] = flat
        table = table.view(nb, DENSE_BLOCK)
        g = RowGossip(table, holder, prefix, None, 1.0, self.gossip_tol, kind="dense")
        seen = holder.get(prefix + "seen")
        if seen is None:
            touched = torch.arange(nb, device=flat.device)
        else:
            touched = table.ne(seen.view(nb, DENSE_BLOCK)).any(dim=1).nonzero().view(-1)
        g.mark(touched)
        g.step(self.exchange, self.topo, self.rank, t, 0, self.traffic, self.group_size)
        holder[prefix + "seen"] = table.reshape(-1).clone()
        return table.view(-1)[:flat.numel()]

    def _dense_step(self, group: dict, t: int) -> None:
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
        flat_x = torch.cat([p.data.reshape(-1) for p in params])
        flat_u = torch.cat([self.state[p]["u"].reshape(-1) for p in params]) if self.adaptive else None
        holder = self.state[params[0]]
        if self.alone:
            new_x, new_u = flat_x, flat_u
        elif self.dense_compressor is None and self.gossip_tol:   # exact up to tol, by blocks
            new_x = self._dense_blocks(holder, "dense_xb", flat_x, t)
            new_u = self._dense_blocks(holder, "dense_ub", flat_u, t) if self.adaptive else None
        elif self.dense_compressor is None:   # exact: x (and u) in one packed buffer per neighbour
            mixed = self._mix(flat_x if flat_u is None else torch.cat([flat_x, flat_u]))
            new_x, new_u = mixed[:flat_x.numel()], (mixed[flat_x.numel():] if self.adaptive else None)
        else:
            new_x = DenseGossip(holder, "dense_x", flat_x, self.dense_compressor, self.gamma).step(
                flat_x, self.exchange, self.topo, self.rank, t, 0, self.traffic,
                self.group_size)
            how = self._tracker_gossip(self.dense_compressor, t) if self.adaptive else None
            if how == "compressed":
                new_u = DenseGossip(holder, "dense_u", flat_u, self.dense_compressor, self.gamma).step(
                    flat_u, self.exchange, self.topo, self.rank, t, 1, self.traffic,
                    self.group_size)
            else:
                new_u = self._mix(flat_u) if how == "exact" else flat_u
        off = 0
        for p in params:
            n = p.numel()
            p.data.copy_(new_x[off:off + n].view_as(p))
            off += n
        if not self.adaptive:
            return
        off = 0
        for p, vn in zip(params, vhat_new):
            st = self.state[p]
            n = p.numel()
            st["u"].copy_(new_u[off:off + n].view_as(p))
            off += n
            st["u"].add_(vn - st["vhat"])
            st["vhat"].copy_(vn)
            u = st["u"]
            if self.tracker_bound:
                u = torch.maximum(u, st["vhat"] * self.tracker_bound)
            p.data.addcdiv_(st["m"], u.clamp(min=group["eps"]).sqrt(),
                            value=-self._step_size(group, t))

    # ------------------------------------------------------------------ tables
    def _table_step(self, group: dict, t: int) -> None:
        b1, b2 = group["betas"]
        for i, p in enumerate(group["params"]):
            st = self.state[p]
            d = p.shape[1]
            dv = 1 if group["rowwise"] else d
            if self.adaptive and "m" not in st:
                st["m"] = torch.zeros_like(p)
                for k in ("v", "vhat", "u"):
                    st[k] = torch.zeros(p.shape[0], dv, dtype=p.dtype, device=p.device)
            xg = None if self.alone else RowGossip(p.data, st, "x", self.compressor, self.gamma,
                                                   self.gossip_tol)
            ug, how = None, None
            if self.adaptive and not self.alone:
                how = self._tracker_gossip(self.compressor, t)
                compressed = how == "compressed"
                ug = RowGossip(st["u"], st, "u", self.compressor if compressed else None,
                               self.gamma if compressed else 1.0, self.gossip_tol)
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
                if xg is not None:
                    xg.mark(rows)
            if xg is not None:
                xg.step(self.exchange, self.topo, self.rank, t, 2 + 2 * i, self.traffic,
                        self.group_size)
            if how is not None:
                ug.step(self.exchange, self.topo, self.rank, t, 3 + 2 * i, self.traffic,
                        self.group_size)
            if self.adaptive and rows is not None:
                add_rows_(st["u"], rows, vhat_new - vhat_old)
                st["vhat"].index_copy_(0, rows, vhat_new)
                u = st["u"].index_select(0, rows)
                if self.tracker_bound:
                    u = torch.maximum(u, vhat_new * self.tracker_bound)
                u = u.clamp(min=group["eps"]).sqrt()
                add_rows_(p.data, rows, m / u, alpha=-self._step_size(group, t))
                if xg is not None:
                    xg.mark(rows)
                    ug.mark(rows)

    @staticmethod
    def _own_dtype(key: str):
        """The dtype a state entry keeps whatever the parameter's: row ids (`*dirty`) int64, the
        public copies and their sums (`*hat`, `*sum`; not AMSGrad's `vhat`) float64."""
        if key.endswith("dirty"):
            return torch.int64
        if (key.endswith("hat") and key != "vhat") or key.endswith("sum"):
            return torch.float64
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer's, except for the state that keeps its own dtype (`_own_dtype`): the base
        class casts every state tensor to the parameter's dtype, and float32 rounds ids > 2**24 and
        undoes the public copies' float64 (a checkpoint from before it was float64 is widened)."""
        own = {(i, k): v.clone() for i, st in state_dict["state"].items() for k, v in st.items()
               if self._own_dtype(k) is not None and isinstance(v, torch.Tensor)}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for (i, k), v in own.items():
            self.state[params[i]][k] = v.to(device=params[i].device, dtype=self._own_dtype(k))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        t = self._step_count()
        for group in self.param_groups:
            if group["sparse"]:
                self._table_step(group, t)
            else:
                self._dense_step(group, t)
        first = self.param_groups[0]["params"][0]
        self.state[first]["gossip_step"] = t + 1
        return None

    @property
    def bytes_sent(self) -> int:
        return sum(v for k, v in self.traffic.items() if k != "exact_bytes")

    def public_copy_bytes(self) -> int:
        """Memory x_hat and s (and the tracker's) take, the price of gossip through public
        copies: two float64 copies of every table and its tracker, and of the dense vector and its
        tracker where it travels by public copies (choco, or gossip_tol > 0). Known before the
        first step (the state itself is made then); 0 for a worker without neighbours."""
        if self.alone:
            return 0
        total = 0
        for group in self.param_groups:
            if group["sparse"]:
                for p in group["params"]:
                    tracker = (p.shape[0] * (1 if group["rowwise"] else p.shape[1])
                               if self.adaptive else 0)
                    total += 2 * 8 * (p.numel() + tracker)
            elif self.dense_compressor is not None or self.gossip_tol:
                n = sum(p.numel() for p in group["params"])
                if self.dense_compressor is None:   # by blocks, the last one padded
                    n = -(-n // DENSE_BLOCK) * DENSE_BLOCK
                total += 2 * 8 * n * (2 if self.adaptive else 1)
        return total


def average_dense_gradients(params: List[nn.Parameter], size: int, group=None) -> int:
    """Average the parameters' gradients over `group` (`size` ranks; None: all) in one flat
    all_reduce; a missing gradient counts as zero. Returns bytes sent."""
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return 0
    flat = torch.cat([g.reshape(-1) for g in grads]).to(comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.to(params[0].device).div_(size)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n
    return flat.numel() * 4


def average_gradients(model: nn.Module, world: int) -> int:
    """The `allreduce` reference: average dense gradients (all_reduce) and row-sparse table
    gradients (all_gather of row ids and rows, padded to the largest). Returns bytes sent."""
    import torch.distributed as dist
    sparse, dense = split_parameters(model)
    sent = average_dense_gradients(dense, world)
    comm = comm_device()
    for p in sparse:
        if p.grad is None:
            rows = torch.zeros(0, dtype=torch.int64, device=comm)
            vals = torch.zeros(0, p.shape[1], device=comm)
        else:
            rows, vals = rows_and_grads(p.grad)
        n = torch.tensor([rows.numel()], device=comm)
        sizes = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(world)]
        dist.all_gather(sizes, n)
        top = max(1, int(max(s.item() for s in sizes)))
        pr = torch.full((top,), -1, dtype=torch.int64, device=comm)
        pr[:rows.numel()] = rows
        pv = torch.zeros(top, p.shape[1], device=comm)
        pv[:rows.numel()] = vals
        all_r = [torch.empty_like(pr) for _ in range(world)]
        all_v = [torch.empty_like(pv) for _ in range(world)]
        dist.all_gather(all_r, pr)
        dist.all_gather(all_v, pv)
        sent += top * (8 + 4 * p.shape[1])
        r = torch.cat([a[:int(s)] for a, s in zip(all_r, sizes)]).to(p.device)
        v = torch.cat([a[:int(s)] for a, s in zip(all_v, sizes)]).to(p.device) / world
        p.grad = torch.sparse_coo_tensor(r.unsqueeze(0), v, p.shape, check_invariants=False).coalesce()
    return sent
