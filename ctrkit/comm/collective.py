"""Bytes a rank puts on the wire for a collective, so `allreduce` compares with gossip like for like.

Gossip counts what each rank hands to `isend` (one message per neighbour: already wire bytes). A
collective's logical payload (the tensor a rank contributes) is not what it sends; this is the
bandwidth term of the ring algorithms (NCCL's ring, gloo's ring; recursive halving-doubling sends
the same per rank at powers of two). It is a model of the algorithm, not a measurement: headers,
tree algorithms and a library's choice of algorithm for small tensors are not in it.
"""
from __future__ import annotations

KINDS = ("all_reduce", "all_gather")


def collective_wire_bytes(kind: str, nbytes: float, n: int) -> float:
    """Bytes one of `n` ranks sends for one collective.

    - "all_reduce" of a tensor of `nbytes` (the same on every rank): a reduce-scatter and an
      all-gather around the ring, each rank sending n - 1 chunks of nbytes / n in each:
      2 (n - 1) / n * nbytes.
    - "all_gather" of a chunk of `nbytes` per rank: each chunk has to reach the n - 1 other
      ranks, and around the ring each rank sends n - 1 chunks (its own, then the ones it relays):
      (n - 1) * nbytes. For chunks of different sizes pass their mean.
    n = 1: 0, nothing leaves the rank.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown collective {kind!r}; known: {', '.join(KINDS)}")
    if n < 1 or nbytes < 0:
        raise ValueError(f"need n >= 1 ranks and nbytes >= 0, got n={n}, nbytes={nbytes}")
    if kind == "all_reduce":
        return 2.0 * (n - 1) / n * nbytes
    return float((n - 1) * nbytes)
