"""Sharded `damsgrad` and `choco` (shard groups, ctrkit/distributed/sharding.py) against the float64
reference of gossip_reference.py.

4 gloo ranks = 2 shard groups of K = 2 ranks; the groups are the 2 workers of a ring. A group holds
one worker's tables, split over its ranks by torchrec's planner, and a replicated dense part; rank
g*K + p gossips only with rank h*K + p of the other group (lift_topology), which holds the same
shard. Each rank feeds its own batch (test_gossip_reference._batches of its global rank); the group
averages its dense gradients (average_dense_grads, as the trainer's train_step does) and torchrec
divides the table gradients by K, so the reference worker g is fed the union of its ranks'
batches. STEPS training rounds, then GOSSIP gossip-only rounds (lr 0).

Compared after every round, on every rank: its table shards (parameters, moments, tracker, public
copies and sums: the rows and columns of the reference's worker table that the shard holds) and
its copy of the dense part (the same state), against
* the reference started from the state the ranks recorded at the round before (assembled, for a
  worker, from its group's shards), with its own float64 gradients there: ROUND_TOL;
* for the lossless cases also a reference running on its own from the initial model: RUN_TOL;
plus: the members of a group hold bit-identical dense parameters and state, s = W x_hat to float64
rounding, mean_i u_i = mean_i vhat_i, and every table entry is held by exactly one rank of a group.

The lossy case is `fp16`, a value coder that rounds entry by entry: on a table it does the same
whether the table is whole or sharded, so the unsharded reference is the algorithm. (Top-k and
random-k pick rows per shard, i.e. another compressor than on the whole table: not compared.) It
runs the lossy-tracker bound u >= vhat / groups (1 / the number of workers, not of ranks); it binds
on a few entries from round 3 on.

torchrec's planner puts the two 16 x 4 tables table-wise, one on each rank of a group (the
placement is found from where each shard's initial values sit, so a column-wise plan is compared
the same way). Measured: one round <= 4.5e-7 of scale, the free runs <= 4.5e-7.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec import KeyedJaggedTensor

import gossip_reference as ref
from ctrkit.comm.compress import build_compressor
from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import build_topology
from ctrkit.distributed.sharding import (ShardedEmbeddingBags, average_dense_grads, lift_topology,
                                         make_grid, shard_model)
from ctrkit.optim.decentralized import DecentralizedOptimizer
from test_gossip_reference import (BETAS, D, EPS, LR_DENSE, LR_TABLES, ROUND_TOL, ROWS, RUN_TOL,
                                   SUM_TOL, TOUCHED, Tiny, _batches, _port)

K, GROUPS = 2, 2
WORLD = K * GROUPS
STEPS, GOSSIP = 4, 3
TABLE_STATE = ("x", "m", "v", "vhat", "u", "xhat", "xsum", "uhat", "usum")
DENSE_STATE = ("dx", "dm", "dv", "dvhat", "du", "dxhat", "dxsum", "duhat", "dusum")


@dataclass(frozen=True)
class Case:
    algorithm: str
    compressor: Optional[str] = None
    gamma: float = 1.0

    @property
    def name(self) -> str:
        return "-".join([f"{GROUPS}x{K}", self.algorithm]
                        + ([f"{self.compressor}-g{self.gamma:g}"] if self.compressor else []))

    @property
    def lossless(self) -> bool:
        return self.compressor in (None, "identity")

    def settings(self) -> ref.Settings:
        comp = ref.Compressor(self.compressor) if self.compressor else None
        return ref.Settings(weights(), self.algorithm, LR_TABLES, LR_DENSE, BETAS, EPS, False,
                            comp, self.gamma)


CASES = [Case("damsgrad"), Case("choco", "identity", 0.6), Case("choco", "fp16", 0.6)]
BY_NAME = {c.name: c for c in CASES}


def weights() -> np.ndarray:
    return ref.mixing_matrix(GROUPS, ref.graph_edges("ring", GROUPS))


# ---------------------------------------------------------------- the ranks

def _placements(model: Tiny, full: Dict[str, np.ndarray]) -> Dict[str, Tuple[int, int, int, int]]:
    """table name -> (first row in the reference's stacked [2 ROWS, D] table, first column, rows,
    columns) of this rank's shard of it, found where the shard's initial values sit in the table."""
    out = {}
    for i, (name, p) in enumerate(zip(model.emb.shard_names, model.emb.sharded_tables)):
        w, (nr, nc) = full[name], p.shape
        sh = p.detach().numpy()
        at = [(r0, c0) for r0 in range(w.shape[0] - nr + 1) for c0 in range(w.shape[1] - nc + 1)
              if np.array_equal(w[r0:r0 + nr, c0:c0 + nc], sh)]
        assert len(at) == 1, (name, p.shape, at)
        base = ROWS * int(name[1:])   # t0: rows 0..ROWS-1 of the reference's table, t1: the next
        out[name] = (base + at[0][0], at[0][1], nr, nc)
    return out


def _snapshot(model: Tiny, opt: DecentralizedOptimizer) -> Dict[str, Dict[str, np.ndarray]]:
    """This rank's shards {table: {key: array}} and dense part {key: flat array}; state not
    created yet has its starting value (zeros; public copies equal to the parameters)."""
    f = lambda t: t.detach().double().numpy().copy()   # noqa: E731
    shards = {}
    for name, p in zip(model.emb.shard_names, model.emb.sharded_tables):
        st, x = opt.state[p], f(p)
        s = {"x": x}
        for k in ("m", "v", "vhat", "u", "uhat", "usum"):
            s[k] = f(st[k]) if k in st else np.zeros_like(x)
        for k in ("xhat", "xsum"):
            s[k] = f(st[k]) if k in st else x
        shards[name] = s
    params = [model.lin.weight, model.lin.bias]
    dx = np.concatenate([f(p).reshape(-1) for p in params])
    dense = {"dx": dx}
    for k in ("m", "v", "vhat", "u"):
        dense["d" + k] = np.concatenate([f(opt.state[p][k]).reshape(-1) if k in opt.state[p]
                                         else np.zeros(p.numel()) for p in params])
    holder = opt.state[params[0]]
    for k, default in (("xhat", dx), ("xsum", dx), ("uhat", 0 * dx), ("usum", 0 * dx)):
        dense["d" + k] = f(holder["dense_" + k]) if "dense_" + k in holder else default
    return {"shards": shards, "dense": dense}


def _run_case(rank: int, grid, case: Case):
    torch.manual_seed(0)                                   # identical replicas at start
    model = Tiny()
    full = {t.name: model.emb.table_weight(i).detach().double().numpy().copy()
            for i, t in enumerate(model.emb.tables)}
    shard_model(model, grid)
    assert isinstance(model.emb, ShardedEmbeddingBags)
    placement = _placements(model, full)
    topo = lift_topology(build_topology("ring", GROUPS), K)
    ex = NeighborExchange(rank, topo.neighbors[rank], num_rows_hint=ROWS)
    kw = {}
    if case.algorithm == "choco":
        c = build_compressor(case.compressor)
        kw = dict(compressor=c, dense_compressor=c, gamma=case.gamma)
    opt = DecentralizedOptimizer(model, case.algorithm, topo, rank, ex, dense_lr=LR_DENSE,
                                 sparse_lr=LR_TABLES, betas=BETAS, eps=EPS, group_size=K, **kw)
    hist = [_snapshot(model, opt)]
    for ids0, ids1, y in _batches(rank)[:STEPS]:
        n = len(y)
        kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.from_numpy(np.concatenate([ids0, ids1])),
                                lengths=torch.ones(2 * n, dtype=torch.int32), stride=n)
        nn.functional.binary_cross_entropy_with_logits(model(kjt), torch.from_numpy(y).float()).backward()
        average_dense_grads(model, grid)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append(_snapshot(model, opt))
    for g in opt.param_groups:
        g["lr"] = 0.0                                      # gossip only from here on
    for _ in range(GOSSIP):
        opt.step()
        hist.append(_snapshot(model, opt))
    return {"placement": placement, "hist": hist,
            "bound": opt.tracker_bound}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        grid = make_grid(rank, WORLD, K)
        out = {c.name: _run_case(rank, grid, c) for c in CASES}
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(out, fh)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """case name -> [rank] -> {"placement", "hist": [round] -> snapshot, "bound"}; one launch."""
    outdir = str(tmp_path_factory.mktemp("sharded_gossip"))
    mp.start_processes(_worker, args=(_port(), outdir), nprocs=WORLD, start_method="fork")
    per_rank = []
    for r in range(WORLD):
        with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as fh:
            per_rank.append(pickle.load(fh))
    return {c.name: [p[c.name] for p in per_rank] for c in CASES}


# ---------------------------------------------------------------- workers from shards, and back

def _worker_state(ranks, t: int) -> ref.State:
    """The reference state of every worker at round t: its tables put together from its group's
    shards (each entry held exactly once), its dense part from the group's first rank."""
    st = {k: np.zeros((GROUPS, 2 * ROWS, D)) for k in TABLE_STATE}
    held = np.zeros((GROUPS, 2 * ROWS, D), dtype=int)
    for r, run in enumerate(ranks):
        g = r // K
        for name, (r0, c0, nr, nc) in run["placement"].items():
            held[g, r0:r0 + nr, c0:c0 + nc] += 1
            for k in TABLE_STATE:
                st[k][g, r0:r0 + nr, c0:c0 + nc] = run["hist"][t]["shards"][name][k]
    assert (held == 1).all(), "every table entry on exactly one rank of its group"
    for k in DENSE_STATE:
        st[k] = np.stack([ranks[g * K]["hist"][t]["dense"][k] for g in range(GROUPS)])
    return st


def _worst(ranks, t: int, want: ref.State, keys) -> Tuple[float, str]:
    """Largest |rank's value - reference| over every rank's shards and dense part, relative to
    the largest |reference| of that quantity (over all workers), and where."""
    worst, where = 0.0, ""
    for k in keys:
        scale = max(float(np.abs(want[k]).max()), 1e-300)
        for r, run in enumerate(ranks):
            g = r // K
            snap = run["hist"][t]
            if k.startswith("d"):
                pairs = [("dense", snap["dense"][k], want[k][g])]
            else:
                pairs = [(f"table {name} rows {r0}.. cols {c0}..", snap["shards"][name][k],
                          want[k][g, r0:r0 + nr, c0:c0 + nc])
                         for name, (r0, c0, nr, nc) in run["placement"].items()]
            for what, got, exp in pairs:
                err = float(np.abs(got - exp).max(initial=0.0)) / scale
                if err > worst:
                    idx = np.unravel_index(int(np.abs(got - exp).argmax()), got.shape)
                    worst, where = err, (f"{k} rank {r} ({what}) index {tuple(map(int, idx))}: "
                                         f"got {got[idx]!r}, reference {exp[idx]!r}")
    return worst, where


def _union_grads(x: np.ndarray, dx: np.ndarray, t: int):
    """float64 gradients of each worker's BCE loss on the union of its group's batches of round t
    (mean over all its samples): table gradient, touched rows, dense gradient."""
    gt, touched, gd = np.zeros_like(x), np.zeros(x.shape[:2], dtype=bool), np.zeros_like(dx)
    for g in range(GROUPS):
        parts = [_batches(r)[t] for r in range(g * K, (g + 1) * K)]
        ids0, ids1, y = (np.concatenate([p[i] for p in parts]) for i in range(3))
        n = len(y)
        rows = np.stack([ids0, ROWS + ids1], axis=1)                 # [n, 2]
        h = x[g][rows].reshape(n, 2 * D)
        w, b = dx[g, :2 * D], dx[g, 2 * D]
        dz = (1.0 / (1.0 + np.exp(-(h @ w + b))) - y) / n
        gd[g] = np.concatenate([h.T @ dz, [dz.sum()]])
        np.add.at(gt[g], rows.reshape(-1), (dz[:, None] * w).reshape(n * 2, D))
        touched[g, rows.reshape(-1)] = True
    return gt, touched, gd


def _reference_round(state: ref.State, t: int, cfg: ref.Settings) -> ref.State:
    if t < STEPS:
        gt, touched, gd = _union_grads(state["x"], state["dx"], t)
        return ref.step(state, gt, touched, gd, cfg)
    return ref.step(state, np.zeros_like(state["x"]), np.zeros(state["x"].shape[:2], dtype=bool),
                    np.zeros_like(state["dx"]), cfg, lr_scale=0.0)


def _keys(case: Case):
    keys = ref.TABLE_KEYS + ref.DENSE_KEYS
    return keys + ref.PUBLIC_KEYS if case.algorithm == "choco" else keys


def _slow_cases(select=lambda c: True):
    return [pytest.param(c.name, marks=pytest.mark.slow, id=c.name) for c in CASES if select(c)]


# ---------------------------------------------------------------- tests

def test_lifted_topology_is_the_group_graph_once_per_shard_position():
    """Rank g*K + p mixes with rank h*K + p with the reference's W[g, h], with nobody else."""
    W = weights()
    topo = lift_topology(build_topology("ring", GROUPS), K)
    for r in range(WORLD):
        g, p = divmod(r, K)
        assert topo.neighbors[r] == tuple(h * K + p for h in range(GROUPS) if h != g and W[g, h] > 0)
        assert topo.self_weight(r) == pytest.approx(W[g, g], abs=1e-15)
        assert topo.neighbor_weights(r) == pytest.approx({h * K + p: W[g, h] for h in range(GROUPS)
                                                          if h != g and W[g, h] > 0}, abs=1e-15)


@pytest.mark.parametrize("name", _slow_cases())
def test_every_round_of_every_shard_matches_the_reference(name, runs):
    case, ranks = BY_NAME[name], runs[name]
    cfg = case.settings()
    assert all(r["bound"] == cfg.bound for r in ranks), ([r["bound"] for r in ranks], cfg.bound)
    for t in range(STEPS + GOSSIP):
        want = _reference_round(_worker_state(ranks, t), t, cfg)
        err, where = _worst(ranks, t + 1, want, _keys(case))
        assert err <= ROUND_TOL, f"round {t + 1}: {err:.3g} of scale at {where}"


@pytest.mark.parametrize("name", _slow_cases(lambda c: c.lossless))
def test_whole_sharded_run_matches_a_free_running_reference(name, runs):
    case, ranks = BY_NAME[name], runs[name]
    cfg = case.settings()
    first = _worker_state(ranks, 0)
    for k, a in first.items():                             # the workers start identical
        assert (a == a[:1]).all(), k
    state = ref.initial_state(first["x"][0], first["dx"][0], GROUPS, False)
    for t in range(STEPS + GOSSIP):
        state = _reference_round(state, t, cfg)
        err, where = _worst(ranks, t + 1, state, _keys(case))
        assert err <= RUN_TOL, f"round {t + 1}: {err:.3g} of scale at {where}"


@pytest.mark.parametrize("name", _slow_cases())
def test_group_members_agree_and_invariants_hold(name, runs):
    """Every round: the ranks of a group hold bit-identical dense parameters and state (one
    worker's replica); s = W x_hat to float64 rounding for the tables' and the dense part's public
    copies; mean_i u_i = mean_i vhat_i; rows nobody touched never moved."""
    case, ranks = BY_NAME[name], runs[name]
    W = weights()
    untouched = np.r_[TOUCHED:ROWS, ROWS + TOUCHED:2 * ROWS]
    x0 = _worker_state(ranks, 0)["x"]
    for t in range(STEPS + GOSSIP + 1):
        for g in range(GROUPS):
            a, b = (ranks[r]["hist"][t]["dense"] for r in range(g * K, (g + 1) * K))
            for k in DENSE_STATE:
                assert np.array_equal(a[k], b[k]), f"round {t}: group {g}'s ranks differ on {k}"
        st = _worker_state(ranks, t)
        pairs = [("xhat", "xsum"), ("uhat", "usum")]
        if case.algorithm == "choco":
            pairs += [("dxhat", "dxsum"), ("duhat", "dusum")]
        for hat, s in pairs:
            scale = max(float(np.abs(st[hat]).max()), 1e-300)
            err = float(np.abs(st[s] - ref.mix(W, st[hat])).max()) / scale
            assert err <= SUM_TOL, f"round {t}: {s} != W {hat}, off by {err:.3g} of scale"
        for u, vhat in (("u", "vhat"), ("du", "dvhat")):
            gap = np.abs(st[u].mean(axis=0) - st[vhat].mean(axis=0)).max()
            assert gap <= ROUND_TOL * max(float(np.abs(st[vhat]).max()), 1e-30), \
                f"round {t}: mean {u} - mean {vhat} = {gap:.3g}"
        assert (st["x"][:, untouched] == x0[:, untouched]).all()
