"""Gossip topologies for decentralized training and their mixing matrices.

`build_topology(name, n, edges)` returns a `Topology`: each worker's neighbours and a symmetric,
doubly stochastic mixing matrix W. Regular graphs get uniform weights 1/(degree+1) (ring: exactly
1/3 to self and each neighbour); irregular ones get Metropolis–Hastings weights
W_ij = 1/(1 + max(d_i, d_j)) on edges and W_ii = 1 - sum_j W_ij.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ctrkit.errors import ConfigError

KNOWN_TOPOLOGIES = ("ring", "torus", "exponential", "complete", "edges")


@dataclass(frozen=True)
class Topology:
    name: str
    n: int  # number of workers
    neighbors: Tuple[Tuple[int, ...], ...]  # neighbors[i]: sorted ranks j != i with W[i, j] > 0
    # [n, n] symmetric doubly stochastic mixing matrix (float64, read-only); it follows from
    # name/n/neighbors, so it takes no part in ==/hash (an ndarray cannot).
    weights: np.ndarray = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        w = np.array(self.weights, dtype=np.float64, copy=True)
        if w.shape != (self.n, self.n):
            raise ValueError(f"weights must have shape ({self.n}, {self.n}), got {w.shape}")
        if len(self.neighbors) != self.n:
            raise ValueError(f"neighbors must have {self.n} entries, got {len(self.neighbors)}")
        w.setflags(write=False)
        object.__setattr__(self, "weights", w)

    def _check_rank(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"rank {i} out of range for {self.n} workers")
        return int(i)

    def self_weight(self, i: int) -> float:
        i = self._check_rank(i)
        return float(self.weights[i, i])

    def neighbor_weights(self, i: int) -> Dict[int, float]:
        i = self._check_rank(i)
        return {j: float(self.weights[i, j]) for j in self.neighbors[i]}

    @property
    def degrees(self) -> Tuple[int, ...]:
        return tuple(len(nb) for nb in self.neighbors)

    @property
    def spectral_gap(self) -> float:
        """1 - max(|lambda_2|, |lambda_n|) of W; 1.0 for a single worker."""
        if self.n == 1:
            return 1.0
        lam = np.linalg.eigvalsh(self.weights)  # ascending; lam[-1] == 1 for a connected graph
        second = max(abs(lam[-2]), abs(lam[0]))
        return float(min(1.0, max(0.0, 1.0 - second)))

    def describe(self) -> str:
        d = self.degrees
        lo, hi = min(d), max(d)
        deg = f"degree {lo}" if lo == hi else f"degree {lo}-{hi}"
        return f"{self.name}: n={self.n}, {deg}, spectral gap {self.spectral_gap:.4g}"


def _ring_edges(n: int) -> Set[Tuple[int, int]]:
    return {(i, (i + 1) % n) for i in range(n)}


def _torus_shape(n: int) -> Tuple[int, int]:
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return r, n // r


def _torus_edges(n: int) -> Set[Tuple[int, int]]:
    r, c = _torus_shape(n)
    edges = set()
    for a in range(r):
        for b in range(c):
            i = a * c + b
            edges.add((i, ((a + 1) % r) * c + b))  # down (wraps)
            edges.add((i, a * c + (b + 1) % c))  # right (wraps)
    return edges


def _exponential_edges(n: int) -> Set[Tuple[int, int]]:
    if n < 2:
        return set()
    kmax = (n - 1).bit_length() - 1  # floor(log2(n - 1))
    return {(i, (i + 2 ** k) % n) for i in range(n) for k in range(kmax + 1)}


def _complete_edges(n: int) -> Set[Tuple[int, int]]:
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


def _is_rank(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _user_edges(n: int, edges: Optional[Sequence[Sequence[int]]]) -> Set[Tuple[int, int]]:
    if edges is None:
        raise ConfigError("topology 'edges' needs an edge list of [i, j] rank pairs")
    if isinstance(edges, (str, bytes)) or not isinstance(edges, (Sequence, np.ndarray)):
        raise ConfigError(f"topology edge list must be a list of [i, j] rank pairs, got {edges!r}")
    out = set()
    for e in edges:
        if isinstance(e, (str, bytes)) or not isinstance(e, (Sequence, np.ndarray)) or len(e) != 2 \
                or not all(_is_rank(x) for x in e):
            raise ConfigError(f"topology edge {e!r} is not a pair of integer ranks [i, j]")
        i, j = int(e[0]), int(e[1])
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(f"topology edge [{i}, {j}] has a rank outside [0, {n}) for n={n} workers")
        out.add((i, j))
    return out


def _unreachable(n: int, nbrs: List[Set[int]]) -> List[int]:
    seen = {0}
    stack = [0]
    while stack:
        for j in nbrs[stack.pop()]:
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return [i for i in range(n) if i not in seen]


def _mixing_matrix(nbrs: Sequence[Sequence[int]]) -> np.ndarray:
    n = len(nbrs)
    deg = [len(nb) for nb in nbrs]
    w = np.zeros((n, n), dtype=np.float64)
    if len(set(deg)) == 1:  # regular: uniform 1/(d+1), diagonal included (ring: exactly 1/3)
        u = 1.0 / (deg[0] + 1)
        for i, nb in enumerate(nbrs):
            w[i, i] = u
            w[i, list(nb)] = u
        return w
    for i, nb in enumerate(nbrs):  # Metropolis–Hastings
        for j in nb:
            w[i, j] = 1.0 / (1 + max(deg[i], deg[j]))
    for i in range(n):
        w[i, i] = 1.0 - (w[i].sum() - w[i, i])
    return w


_BUILDERS = {"ring": _ring_edges, "torus": _torus_edges, "exponential": _exponential_edges,
             "complete": _complete_edges}


def build_topology(name: str, n: int, edges: Optional[Sequence[Sequence[int]]] = None) -> Topology:
    """Build a connected gossip topology over `n` workers; raise ConfigError on bad input."""
    if not isinstance(name, str) or name.strip().lower() not in KNOWN_TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; known: {', '.join(KNOWN_TOPOLOGIES)}")
    name = name.strip().lower()
    if not _is_rank(n):
        raise ConfigError(f"topology {name!r}: number of workers must be an integer, got {n!r}")
    n = int(n)
    if n < 1:
        raise ConfigError(f"topology {name!r}: number of workers must be >= 1, got {n}")
    if name == "edges":
        pairs = _user_edges(n, edges)
    else:
        if edges is not None:
            raise ConfigError(f"an edge list is only used with topology 'edges', not {name!r}")
        pairs = _BUILDERS[name](n)
    nbrs: List[Set[int]] = [set() for _ in range(n)]
    for i, j in pairs:
        if i != j:  # self loops (and, via sets, duplicates / both directions) are ignored
            nbrs[i].add(j)
            nbrs[j].add(i)
    missing = _unreachable(n, nbrs)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ConfigError(f"topology {name!r} with n={n} is disconnected: "
                          f"rank(s) {shown} unreachable from rank 0")
    neighbors = tuple(tuple(sorted(nb)) for nb in nbrs)
    return Topology(name=name, n=n, neighbors=neighbors, weights=_mixing_matrix(neighbors))


def single_worker() -> Topology:
    """One worker without neighbours (W = [[1]]): a gossip optimizer over it sends nothing and
    takes only its local step. It is the graph damsgrad has at n = 1, and the one-node view on
    which `allreduce` with `distributed.base_optimizer=amsgrad` runs damsgrad's step on every rank."""
    return Topology(name="single", n=1, neighbors=((),), weights=np.ones((1, 1)))
