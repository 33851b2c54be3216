"""What a training or evaluation step consumes: `Batch(dense, sparse, labels, facts)`.

The loader (ctrkit/data/loader.py) makes batches. Models take tensors only,
`model(dense, sparse) -> logits [B]` (ctrkit/models/), so `batch.logits(model)` is how a step calls
one. `facts` holds what the loader found out about the batch's ids once, in its prefetch thread,
so the step does not find it again: explicit fields, never attributes hidden on the
KeyedJaggedTensor. They reach the table modules through `batch_facts` (a context variable that
`batch.logits` sets for the forward), not as a forward argument.

    >>> b = Batch(torch.zeros(2, 13), kjt, torch.zeros(2))    # doctest: +SKIP
    >>> b.size, b.facts.one_per_bag                            # (2, None): nothing known yet
    >>> logits = b.logits(model)                               # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torchrec import KeyedJaggedTensor

from ctrkit.data.ids import DistinctIds


@dataclass
class BatchFacts:
    # every (sample, feature) bag holds exactly one id (None: not known; a table module finds out)
    one_per_bag: Optional[bool] = None
    # the batch's distinct (feature << 32 | id) keys in batch-major order, from the loader
    unique: Optional[DistinctIds] = None
    # distinct rows a table module found, reused by the modules with tables of the same sizes
    # that read the same batch (DeepFM's field embeddings and first-order weights); never moved
    shared: dict = field(default_factory=dict)

    def moved(self, move: Callable[[torch.Tensor], torch.Tensor]) -> "BatchFacts":
        """The loader's facts with their tensors moved (the modules' `shared` finds stay behind)."""
        unique = DistinctIds(*(move(t) for t in self.unique)) if self.unique is not None else None
        return BatchFacts(self.one_per_bag, unique)


_FACTS: contextvars.ContextVar[Optional[BatchFacts]] = contextvars.ContextVar("ctrkit_batch_facts",
                                                                              default=None)


@contextlib.contextmanager
def batch_facts(facts: BatchFacts) -> Iterator[BatchFacts]:
    """Inside the block, the table modules of a model's forward read `facts` (`current_facts`)."""
    token = _FACTS.set(facts)
    try:
        yield facts
    finally:
        _FACTS.reset(token)


def current_facts() -> BatchFacts:
    """The facts set by the enclosing `batch_facts`; a fresh, empty `BatchFacts` outside one
    (then modules that read the same batch share nothing found about it)."""
    facts = _FACTS.get()
    return facts if facts is not None else BatchFacts()


@dataclass
class Batch:
    dense: torch.Tensor            # [B, Dn] float32
    sparse: KeyedJaggedTensor      # one bag per categorical feature and sample
    labels: torch.Tensor           # [B] float32
    facts: BatchFacts = field(default_factory=BatchFacts)

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def logits(self, model: Callable[[torch.Tensor, KeyedJaggedTensor], torch.Tensor]) -> torch.Tensor:
        """`model(dense, sparse)` with this batch's facts reaching its table modules: [B]."""
        with batch_facts(self.facts):
            return model(self.dense, self.sparse)

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device`, with the loader's facts, so the step on a GPU skips the same
        work as on the CPU."""
        if self.labels.device == device:
            return self
        nb = device.type == "cuda" and self.labels.is_pinned()
        move = lambda t: t.to(device, non_blocking=nb)   # noqa: E731
        return Batch(move(self.dense), self.sparse.to(device, non_blocking=nb), move(self.labels),
                     self.facts.moved(move))

    def pin_memory(self) -> "Batch":
        """Page-locked host copies, so the copy to the GPU overlaps the step."""
        kjt = KeyedJaggedTensor(keys=self.sparse.keys(), values=self.sparse.values().pin_memory(),
                                lengths=self.sparse.lengths().pin_memory(),
                                stride=self.sparse.stride())
        return Batch(self.dense.pin_memory(), kjt, self.labels.pin_memory(),
                     self.facts.moved(lambda t: t.pin_memory()))
