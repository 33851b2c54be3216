"""A float64 reference of DESIGN.md's "Decentralized adaptive optimization", for the tests.

n workers live in one process as stacked numpy arrays (axis 0 = worker). Nothing here imports
ctrkit: the mixing matrices, the compressors and both algorithms are written from the equations.

One round of worker i, in the order DESIGN.md says is used (gossip, tracker correction, step):

    m = b1 m + (1-b1) g ;  v = b2 v + (1-b2) g^2 ;  vhat_new = max(vhat, v)
    x <- gossip(x) ;  u <- gossip(u)
    u <- u + vhat_new - vhat ;  vhat <- vhat_new
    x <- x - lr m / sqrt(max(u, bound vhat, eps))          (bound = 1/n for a lossy tracker)

Embedding tables are lazy: m, v, vhat change and the step is taken only on the rows the worker's
batch touched (the gradient of an untouched row is not a zero gradient, it is no update at all);
`rowwise` keeps one second moment per row (the mean of g^2 over the row). Dense parameters are
one flat vector per worker, every entry "touched".

gossip is exact mixing x_i <- sum_j W_ij x_j (`damsgrad`) or CHOCO with public copies (`choco`):

    q_i = C(x_i - xhat_i) ;  xhat_i += q_i ;  s_i += sum_j W_ij q_j ;  x_i += gamma (s_i - xhat_i)

C is the identity, top-k (rows by L2 norm among the rows with x - xhat != 0, k = ceil(R U) of U
such rows; dense entries by magnitude, k = ceil(R P) of all P entries) or fp16 (every entry of the
difference, taken to float32 as a float32 run holds it, rounded to IEEE half precision; a value
coder that acts entry by entry, so it is the same on a whole table and on its shards).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

State = Dict[str, np.ndarray]   # keys below; each value stacked over workers
TABLE_KEYS = ("x", "m", "v", "vhat", "u")
DENSE_KEYS = ("dx", "dm", "dv", "dvhat", "du")
PUBLIC_KEYS = ("xhat", "xsum", "uhat", "usum", "dxhat", "dxsum", "duhat", "dusum")


# ---------------------------------------------------------------- graphs and mixing weights

def graph_edges(name: str, n: int, edges: Optional[Sequence[Sequence[int]]] = None):
    """Undirected edges {i, j}, i != j, of the named graph."""
    if name == "ring":
        pairs = [(i, (i + 1) % n) for i in range(n)]
    elif name == "complete":
        pairs = [(i, j) for i in range(n) for j in range(n)]
    elif name == "exponential":   # i ~ i + 2^k (mod n) for every power of two 2^k < n
        pairs = [(i, (i + 2 ** k) % n) for i in range(n) for k in range(n) if 2 ** k < n]
    elif name == "edges":
        pairs = [tuple(e) for e in edges]
    else:
        raise ValueError(name)
    return {frozenset(p) for p in pairs if p[0] != p[1]}


def mixing_matrix(n: int, edges: Iterable[frozenset]) -> np.ndarray:
    """Regular graph: 1/(d+1) to self and each neighbour. Otherwise Metropolis-Hastings:
    W_ij = 1/(1 + max(d_i, d_j)) on edges, W_ii = 1 - sum_j W_ij."""
    adj = np.zeros((n, n), dtype=bool)
    for e in edges:
        i, j = tuple(e)
        adj[i, j] = adj[j, i] = True
    deg = adj.sum(axis=1)
    if len(set(deg.tolist())) == 1:
        return (adj | np.eye(n, dtype=bool)) / (deg[0] + 1.0)
    w = np.where(adj, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    return w + np.diag(1.0 - w.sum(axis=1))


def mix(W: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum_j W_ij y_j for every worker i."""
    return np.tensordot(W, y, axes=1)


# ---------------------------------------------------------------- compressors

class IllConditioned(AssertionError):
    """A top-k choice that float32 rounding could flip, and no recorded choice to check instead."""


# Scores closer than this (relative) are a coin toss between a float32 run and this reference.
# Adam's first step is sign-like (|m / sqrt(vhat)| = (1 - b1) / sqrt(1 - b2) per entry), so rows
# and entries that moved only by one first step tie exactly: top-k is then not a function.
TIE = 1e-5


def _top(score: np.ndarray, k: int, chosen: Optional[np.ndarray] = None) -> np.ndarray:
    """Positions of the k largest scores. On a tie at the boundary, `chosen` (a boolean mask: what
    the run under test picked) is used if it is a valid top-k, i.e. has k entries and none of them
    scores below an unchosen one by more than TIE."""
    order = np.argsort(-score, kind="stable")
    if 0 < k < len(score):
        a, b = score[order[k - 1]], score[order[k]]
        if a > 0 and b > 0 and a - b <= TIE * a:
            if chosen is None:
                raise IllConditioned(f"top-{k} boundary scores {a!r} and {b!r} tie")
            lo, hi = score[chosen].min(initial=np.inf), score[~chosen].max(initial=0.0)
            if chosen.sum() != k or lo < hi * (1 - TIE):
                raise AssertionError(f"not a top-{k} choice: {int(chosen.sum())} picked, lowest "
                                     f"picked score {lo!r} < highest unpicked {hi!r}")
            return np.flatnonzero(chosen)
    return order[:k]


def _fp16(d: np.ndarray) -> np.ndarray:
    """Round to half precision (nearest even, subnormals kept, +-65504 at most) from float32."""
    return np.clip(d.astype(np.float32), -65504, 65504).astype(np.float16).astype(np.float64)


@dataclass(frozen=True)
class Compressor:
    """'identity', 'topk:R' or 'fp16'."""
    spec: str

    @property
    def lossy(self) -> bool:
        return self.spec != "identity"

    def _k(self, count: int) -> int:
        return math.ceil(Fraction(self.spec.split(":")[1]) * count)

    def rows(self, d: np.ndarray, chosen: Optional[np.ndarray] = None) -> np.ndarray:
        """C of one worker's [R, D] table difference: the rows it sends, zeros elsewhere.
        `chosen` [R]: the rows the run under test sent, consulted only on ties."""
        if not self.lossy:
            return d.copy()
        if self.spec == "fp16":
            return _fp16(d)
        cand = np.flatnonzero((d != 0).any(axis=1))
        keep = cand[_top(np.square(d[cand]).sum(axis=1), self._k(len(cand)),
                         None if chosen is None else chosen[cand])]
        out = np.zeros_like(d)
        out[keep] = d[keep]
        return out

    def dense(self, d: np.ndarray, chosen: Optional[np.ndarray] = None) -> np.ndarray:
        """C of one worker's flat [P] dense difference (`chosen` [P]: as for rows)."""
        if not self.lossy:
            return d.copy()
        if self.spec == "fp16":
            return _fp16(d)
        keep = _top(np.abs(d), self._k(d.size), chosen)
        out = np.zeros_like(d)
        out[keep] = d[keep]
        return out


def choco_gossip(W, y, yhat, s, compress, gamma, chosen=None):
    """One CHOCO round for all workers: returns the new (y, yhat, s). `chosen`: per worker, what
    the run under test sent (for top-k ties), or None."""
    q = np.stack([compress(y[i] - yhat[i], None if chosen is None else chosen[i])
                  for i in range(len(y))])
    yhat = yhat + q
    s = s + mix(W, q)
    return y + gamma * (s - yhat), yhat, s


# ---------------------------------------------------------------- one round

@dataclass(frozen=True)
class Settings:
    W: np.ndarray
    algorithm: str                  # "damsgrad" (exact mixing) or "choco"
    lr_tables: float
    lr_dense: float
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-16
    rowwise: bool = False
    compressor: Optional[Compressor] = None   # choco only
    gamma: float = 1.0

    @property
    def bound(self) -> float:
        lossy = self.algorithm == "choco" and self.compressor.lossy
        return 1.0 / len(self.W) if lossy else 0.0


def initial_state(table: np.ndarray, dense: np.ndarray, n: int, rowwise: bool) -> State:
    """Identical replicas, zero moments and trackers; public copies equal x, so s = W xhat = x."""
    rep = lambda a: np.repeat(a[None].astype(np.float64), n, axis=0)   # noqa: E731
    x, dx = rep(table), rep(dense)
    st = dict(x=x, m=np.zeros_like(x), dx=dx, dm=np.zeros_like(dx))
    dv = x[..., :1] if rowwise else x
    for k in ("v", "vhat", "u", "uhat", "usum"):
        st[k] = np.zeros_like(dv)
    for k in ("dv", "dvhat", "du", "duhat", "dusum"):
        st[k] = np.zeros_like(dx)
    st.update(xhat=x.copy(), xsum=x.copy(), dxhat=dx.copy(), dxsum=dx.copy())
    return st


def _block(st: State, p: str, g, touched, lr, cfg: Settings, rows: bool, chosen) -> State:
    """One round of one block (p = "" for the table, "d" for the dense vector)."""
    b1, b2 = cfg.betas
    x, m, v, vhat, u = (st[p + k] for k in ("x", "m", "v", "vhat", "u"))
    g2 = np.square(g)
    if rows and cfg.rowwise:
        g2 = g2.mean(axis=-1, keepdims=True)
    t = touched
    m = np.where(t, b1 * m + (1 - b1) * g, m)
    v = np.where(t, b2 * v + (1 - b2) * g2, v)
    vhat_new = np.where(t, np.maximum(vhat, v), vhat)
    out = {}
    if cfg.algorithm == "damsgrad":
        x, u = mix(cfg.W, x), mix(cfg.W, u)
    else:
        c = cfg.compressor.rows if rows else cfg.compressor.dense
        x, out[p + "xhat"], out[p + "xsum"] = choco_gossip(cfg.W, x, st[p + "xhat"], st[p + "xsum"],
                                                          c, cfg.gamma, chosen.get(p + "x"))
        u, out[p + "uhat"], out[p + "usum"] = choco_gossip(cfg.W, u, st[p + "uhat"], st[p + "usum"],
                                                          c, cfg.gamma, chosen.get(p + "u"))
    u = u + (vhat_new - vhat)
    vhat = vhat_new
    den = np.sqrt(np.maximum(np.maximum(u, cfg.bound * vhat), cfg.eps))
    x = x - lr * np.where(t, m / den, 0.0)
    out.update({p + "x": x, p + "m": m, p + "v": v, p + "vhat": vhat, p + "u": u})
    return out


def step(st: State, table_grad: np.ndarray, table_touched: np.ndarray, dense_grad: np.ndarray,
         cfg: Settings, lr_scale: float = 1.0,
         chosen: Optional[Dict[str, np.ndarray]] = None) -> State:
    """One round for every worker. table_grad [n, R, D]; table_touched [n, R] (rows in the batch);
    dense_grad [n, P]. lr_scale 0 makes a gossip-only round. `chosen` ("x", "u" [n, R]; "dx",
    "du" [n, P]): what the run under test sent, consulted only to settle top-k ties. Returns a
    new state."""
    chosen = chosen or {}
    new = {k: a.copy() for k, a in st.items()}
    new.update(_block(st, "", table_grad, table_touched[..., None], cfg.lr_tables * lr_scale, cfg,
                      rows=True, chosen=chosen))
    new.update(_block(st, "d", dense_grad, np.ones_like(dense_grad, dtype=bool),
                      cfg.lr_dense * lr_scale, cfg, rows=False, chosen=chosen))
    return new
