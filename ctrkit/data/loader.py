"""Batches from encoded shards: `Batch(dense, sparse: KeyedJaggedTensor, labels, facts)` with prefetch.

The order of an epoch is a pure function of (seed, epoch, rank, world size): shards are visited in a
seeded order and rows shuffled inside each shard. Each rank of a distributed run takes its own
disjoint slice of every shard. Resuming skips batches by position without reading them.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from ctrkit.data.batch import Batch, BatchFacts
from ctrkit.data.ids import distinct_ids
from ctrkit.data.prefetch import prefetch
from ctrkit.data.schema import Schema
from ctrkit.data.shards import Bags, load_shard



class BatchLoader:
    """Iterates one split's batches; `len()` is the number of batches per epoch for this rank."""

    def __init__(self, schema: Schema, split: str, batch_size: int, shuffle: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 prefetch: int = 4, precompute_unique: bool = True, pin_memory: bool = False) -> None:
        if split not in schema.splits:
            raise KeyError(f"split '{split}' was not prepared")
        self.schema, self.split, self.batch_size = schema, split, batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last, self.prefetch = drop_last, prefetch
        self.precompute_unique = precompute_unique
        self.pin_memory = pin_memory   # for a GPU run: batches in page-locked memory
        self.keys = [f.name for f in schema.sparse]
        self.shards = [load_shard(schema.root, s) for s in schema.splits[split].shards]
        self.epoch = 0
        self.start_batch = 0
        self._ones: dict = {}
        self._feature_shift = np.arange(len(self.keys), dtype=np.int64) << 32

    def _slice(self, n: int) -> tuple:
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def rows(self) -> int:
        return sum(self._slice(s.rows)[1] - self._slice(s.rows)[0] for s in self.shards)

    def __len__(self) -> int:
        n = self.rows()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """Next iteration yields `epoch`'s batches from index `batch` on."""
        self.epoch, self.start_batch = epoch, batch

    def _order(self) -> List[tuple]:
        """(shard index, row indices) for every batch of this epoch and rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        shard_order = rng.permutation(len(self.shards)) if self.shuffle else range(len(self.shards))
        rows: List[tuple] = []
        for si in shard_order:
            lo, hi = self._slice(self.shards[si].rows)
            idx = np.arange(lo, hi)
            if self.shuffle:
                idx = np.random.default_rng([self.seed, self.epoch, int(si), self.rank]).permutation(idx)
            rows.append((int(si), idx))
        # Batches may span shard boundaries: concatenate the per-shard orders lazily.
        out, pending, pend_n = [], [], 0
        for si, idx in rows:
            pos = 0
            while pos < len(idx):
                take = min(self.batch_size - pend_n, len(idx) - pos)
                pending.append((si, idx[pos:pos + take]))
                pend_n += take
                pos += take
                if pend_n == self.batch_size:
                    out.append(pending)
                    pending, pend_n = [], 0
        if pending and not self.drop_last:
            out.append(pending)
        return out

    def _gather(self, parts: List[tuple]) -> tuple:
        """(sparse [B, F] ids, dense [B, Dn], labels [B], multi-hot bags) of one batch's rows."""
        if len(parts) == 1:
            sh, idx = self.shards[parts[0][0]], parts[0][1]
            sparse, dense, labels = sh.sparse[idx], sh.dense[idx], sh.labels[idx]
            multi = sh.take(idx) if sh.multi else {}
        else:
            sparse = np.concatenate([self.shards[si].sparse[idx] for si, idx in parts])
            dense = np.concatenate([self.shards[si].dense[idx] for si, idx in parts])
            labels = np.concatenate([self.shards[si].labels[idx] for si, idx in parts])
            multi = {}
            if self.shards[parts[0][0]].multi:
                taken = [self.shards[si].take(idx) for si, idx in parts]
                multi = {m: (np.concatenate([t[m][0] for t in taken]),
                             np.concatenate([t[m][1] for t in taken])) for m in taken[0]}
        return sparse, dense, labels, multi

    def _make(self, parts: List[tuple]) -> Batch:
        sparse, dense, labels, multi = self._gather(parts)
        batch = make_batch(self.keys, sparse, dense, labels, self._ones,
                           self._feature_shift if self.precompute_unique else None, multi)
        return batch.pin_memory() if self.pin_memory else batch

    def __iter__(self) -> Iterator[Batch]:
        plan = self._order()[self.start_batch:]
        self.start_batch = 0
        made = (self._make(parts) for parts in plan)
        yield from (made if self.prefetch <= 0 else
                    prefetch(made, self.prefetch, name=f"ctrkit-loader-{self.split}"))


def make_batch(keys: List[str], sparse: np.ndarray, dense: np.ndarray, labels: np.ndarray,
               ones: Optional[dict] = None, feature_shift: Optional[np.ndarray] = None,
               multi: Optional[Bags] = None) -> Batch:
    """One `Batch` from a batch's rows: sparse ids [B, F], dense [B, Dn], labels [B] (numpy);
    `multi`: the multi-hot features' bags (their columns of `sparse` are not read).

    `ones` caches the all-ones lengths per batch size; with `feature_shift` (feature f's
    f << 32) the batch's distinct (feature, id) pairs are found here, in the loader's prefetch
    thread, so the training step does not sort: keys are feature << 32 | id in batch-major order,
    which sort exactly like rows of tables laid out feature after feature. numpy only: no torch
    op runs in this thread (see ctrkit/data/ids.py)."""
    b = labels.shape[0]
    if multi:   # bags of several ids: the KJT's real lengths, key after key
        vals = [multi[k][0] if k in multi else sparse[:, j] for j, k in enumerate(keys)]
        lens = [multi[k][1] if k in multi else np.ones(b, np.int32) for k in keys]
        kjt = KeyedJaggedTensor(keys=keys, values=torch.from_numpy(np.concatenate(vals).astype(np.int64)),
                                lengths=torch.from_numpy(np.concatenate(lens).astype(np.int32)), stride=b)
        return Batch(torch.from_numpy(np.ascontiguousarray(dense)), kjt, torch.from_numpy(labels),
                     BatchFacts(one_per_bag=False))
    ones = {} if ones is None else ones
    lengths = ones.get(b)
    if lengths is None:
        lengths = ones[b] = torch.ones(len(keys) * b, dtype=torch.int32)
    values = torch.from_numpy(sparse.T.astype(np.int64).reshape(-1))   # table-major, as KJT wants
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=b)
    facts = BatchFacts(one_per_bag=True)
    if feature_shift is not None:
        ids = sparse.astype(np.int64)
        ids += feature_shift
        facts.unique = distinct_ids(ids.reshape(-1))
    return Batch(torch.from_numpy(np.ascontiguousarray(dense)), kjt, torch.from_numpy(labels),
                 facts)
