"""Embedding tables for CTR models: torchrec table configs, one batched lookup for all tables.

`BatchedEmbeddingBags` is a drop-in for torchrec's `EmbeddingBagCollection` on a single worker: it
takes the same `EmbeddingBagConfig`s and a `KeyedJaggedTensor`, but keeps all tables of one
dimension in one flat weight and looks them up with a single `embedding_bag` call over the touched
rows only, so the weight's gradient is *row-sparse* (a coalesced sparse COO tensor). An unsharded torchrec EBC produces dense gradients (O(table size) per step), and a
per-table Python loop costs ~5x more on CPU; see ../shared/notes/torchrec-cpu.md.
`to_torchrec()` exports a real `EmbeddingBagCollection` with the same weights (for sharding with
torchrec's planner and for serving).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from ctrkit.data.batch import BatchFacts
from ctrkit.data.ids import DistinctIds, distinct_ids


class FeatureSelector:
    """The features a table module reads, in its tables' order, out of a batch's KJT."""

    def __init__(self, feature_names: Sequence[str]) -> None:
        self.feature_names = list(feature_names)
        self._perm_cache: Dict[tuple, List[int]] = {}
        self._perm_index: Dict[tuple, torch.Tensor] = {}   # (keys, device) -> perm as a tensor

    def __call__(self, kjt: KeyedJaggedTensor,
                 facts: BatchFacts) -> Tuple[KeyedJaggedTensor, BatchFacts]:
        """(the selected KJT, the facts that hold for it)."""
        keys = tuple(kjt.keys())
        if list(keys) == self.feature_names:
            return kjt, facts
        perm = self._perm_cache.get(keys)
        if perm is None:
            index = {k: i for i, k in enumerate(keys)}
            missing = [f for f in self.feature_names if f not in index]
            if missing:
                raise KeyError(f"features {missing} are not in the batch (has {list(keys)})")
            perm = self._perm_cache[keys] = [index[f] for f in self.feature_names]
        if facts.one_per_bag:
            # One id per bag: the selected features are rows of a [F, B] view; no per-key lengths
            # to read back (a host sync on a GPU) and no fbgemm permute kernel.
            b, dev = kjt.stride(), kjt.values().device
            idx = self._perm_index.get((keys, dev))
            if idx is None:   # made once: a copy from pageable host memory waits for the GPU
                idx = self._perm_index[(keys, dev)] = torch.tensor(perm, device=dev)
            out = KeyedJaggedTensor(
                keys=self.feature_names, stride=b,
                values=kjt.values().view(len(keys), b).index_select(0, idx).reshape(-1),
                lengths=kjt.lengths().view(len(keys), b).index_select(0, idx).reshape(-1))
            return out, BatchFacts(one_per_bag=True)
        return kjt.permute(perm), BatchFacts()


class TableModule(nn.Module):
    """What every embedding-table module is (batched here, fused in ctrkit/models/fused.py,
    sharded in ctrkit/distributed/sharding.py), so callers need no switch on its kind.

    It holds `tables` (torchrec `EmbeddingBagConfig`s of one `embedding_dim`), reads their
    `feature_names`, and `forward(kjt, facts=None)` returns [B, T, D], table t's pooled bag of
    sample b at [b, t]. The methods below say how it is trained and saved. A module that updates
    its tables inside backward (fbgemm's fused TBE) exposes that update's learning rate as an
    ordinary optimizer, `fused_optimizer`; the others have None.
    """
    tables: List[EmbeddingBagConfig]
    feature_names: List[str]
    embedding_dim: int
    fused_optimizer: Optional[torch.optim.Optimizer] = None

    def row_sparse_parameters(self) -> List[nn.Parameter]:
        """The weights an optimizer updates from their row-sparse gradients (none: the module
        updates itself inside backward)."""
        return []

    def canonical_state(self, prefix: str) -> Optional[Tuple[Dict[str, torch.Tensor], set]]:
        """({`<prefix><table name>`: rows x dim}, the own state keys they replace), the same keys
        for every layout so torch.distributed.checkpoint reshards; None: the state as it is."""
        return None


class BatchedEmbeddingBags(TableModule):
    """All tables of one embedding dimension; `forward(kjt) -> [B, T, D]` pooled per table.

    Each table reads exactly one feature (as torchrec tables usually do); several tables may read
    the same feature (e.g. DeepFM's first-order weights and its field embeddings).
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], init_std: float = 1e-4) -> None:
        super().__init__()
        if not tables:
            raise ValueError("BatchedEmbeddingBags needs at least one table")
        dims = {t.embedding_dim for t in tables}
        if len(dims) != 1:
            raise ValueError(f"all tables must share one embedding_dim, got {sorted(dims)}")
        if any(t.pooling not in (PoolingType.SUM, PoolingType.MEAN) for t in tables):
            raise ValueError("tables must pool by SUM or MEAN")
        for t in tables:
            if len(t.feature_names) != 1:
                raise ValueError(f"table {t.name}: exactly one feature per table is supported")
        self.tables: List[EmbeddingBagConfig] = list(tables)
        self.embedding_dim = tables[0].embedding_dim
        # one pooling for all (sum or mean), else sums with the MEAN tables' bags divided by
        # their lengths (only bags of several ids differ: a one-id bag's mean is its sum)
        means = [i for i, t in enumerate(tables) if t.pooling == PoolingType.MEAN]
        self.mode = "mean" if len(means) == len(tables) else "sum"
        self.mean_tables = means if 0 < len(means) < len(tables) else []
        self.feature_names = [t.feature_names[0] for t in tables]
        rows = torch.tensor([t.num_embeddings for t in tables], dtype=torch.int64)
        self.register_buffer("row_offsets", torch.cumsum(rows, 0) - rows, persistent=False)
        self.num_rows = int(rows.sum())
        self._sizes = tuple(t.num_embeddings for t in tables)
        self.weight = nn.Parameter(torch.empty(self.num_rows, self.embedding_dim))
        nn.init.normal_(self.weight, 0.0, init_std)
        self.select = FeatureSelector(self.feature_names)

    def row_sparse_parameters(self) -> List[nn.Parameter]:
        return [self.weight]

    def canonical_state(self, prefix: str) -> Tuple[Dict[str, torch.Tensor], set]:
        return ({f"{prefix}{t.name}": self.table_weight(i).detach() for i, t in enumerate(self.tables)},
                {f"{prefix}weight"})

    def flat_indices(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        """Row ids into the flat weight, in KJT (table-major) order."""
        values = kjt.values().to(torch.int64)
        # (ids per key from the lengths, as tensors: torch.export traces it, no host sync)
        per_key = kjt.lengths().view(len(self.tables), kjt.stride()).sum(1)
        return values + torch.repeat_interleave(self.row_offsets, per_key,
                                                output_size=values.numel())

    def _lookup_indices(self, kjt: KeyedJaggedTensor, single: bool) -> torch.Tensor:
        """Flat row ids; batch-major for one-id bags, table-major (KJT order) otherwise."""
        if single:   # [T, B] ids: no per-key lengths needed (reading them would wait for a GPU)
            ids = kjt.values().to(torch.int64).view(len(self.tables), kjt.stride())
            return (ids + self.row_offsets.unsqueeze(1)).t().reshape(-1)
        return self.flat_indices(kjt)

    def forward(self, kjt: KeyedJaggedTensor, facts: Optional[BatchFacts] = None) -> torch.Tensor:
        """[B, T, D]: each table's pooled bags; `facts` (the batch's, ctrkit/data/batch.py) spare
        finding what the loader already knows."""
        kjt, facts = self.select(kjt, facts if facts is not None else BatchFacts())
        t, b = len(self.tables), kjt.stride()
        # One id per bag (the usual CTR case): a plain gather in batch-major order, so the result
        # is a contiguous [B, T, D]; in training its backward is a segment sum over the batch's
        # grouped ids (`_GatherRows`), several times cheaper on CPU than embedding_bag's backward.
        single = _one_id_per_bag(kjt, t * b, facts)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            # Look up only the touched rows: their gradient becomes the weight's sparse, coalesced
            # gradient (sorted unique rows), so optimizers skip the sort/merge of duplicates.
            rows, ids = self._distinct(kjt, single, facts)
            weight = self.weight.detach().index_select(0, rows).requires_grad_()
            weight.register_hook(lambda g, rows=rows: self._accumulate_grad(rows, g))
            if single:
                return _GatherRows.apply(weight, ids).view(b, t, self.embedding_dim)
            idx = ids.inverse
        else:
            idx, weight = self._lookup_indices(kjt, single), self.weight
            if single:
                return _gather(weight, idx).view(b, t, self.embedding_dim)
        # (offsets by torch's cumsum, not kjt.offsets(): fbgemm's op would tie an exported
        # program to fbgemm)
        lengths = kjt.lengths().to(torch.int64)
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        pooled = F.embedding_bag(idx, weight, offsets, mode=self.mode,
                                 include_last_offset=True).view(t, b, self.embedding_dim)
        if self.mean_tables:
            m = torch.tensor(self.mean_tables, device=pooled.device)
            n = kjt.lengths().view(t, b).index_select(0, m).clamp(min=1).to(pooled.dtype)
            pooled = pooled.index_copy(0, m, pooled.index_select(0, m) / n.unsqueeze(-1))
        return pooled.transpose(0, 1)

    def _distinct(self, kjt: KeyedJaggedTensor, single: bool,
                  facts: BatchFacts) -> Tuple[torch.Tensor, DistinctIds]:
        """Sorted touched rows of the flat weight, and the batch's ids grouped by row.

        The loader usually found the batch's distinct ids already; otherwise modules whose tables
        have the same sizes and read the same batch (DeepFM's field embeddings and first-order
        weights) share one sort through the batch's facts (`shared`).
        """
        pre = facts.unique
        if single and pre is not None and list(kjt.keys()) == self.feature_names:
            # From the loader: keys are feature << 32 | id in batch-major order.
            return self.row_offsets.index_select(0, pre.keys >> 32) + (pre.keys & 0xFFFFFFFF), pre
        cache = facts.shared
        key = (self._sizes, single)
        if key not in cache:
            ids = distinct_ids(self._lookup_indices(kjt, single))
            cache[key] = (ids.keys, ids)
        return cache[key]

    def _accumulate_grad(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        g = torch.sparse_coo_tensor(rows.unsqueeze(0), grad, self.weight.shape, is_coalesced=True,
                                    check_invariants=False)
        self.weight.grad = g if self.weight.grad is None else (self.weight.grad + g).coalesce()

    def table_weight(self, i: int) -> torch.Tensor:
        """View of table i's rows inside the flat weight."""
        start = int(self.row_offsets[i])
        return self.weight[start:start + self.tables[i].num_embeddings]

    def to_torchrec(self) -> EmbeddingBagCollection:
        """A torchrec EmbeddingBagCollection holding a copy of these weights."""
        ebc = EmbeddingBagCollection(tables=self.tables, device=self.weight.device)
        with torch.no_grad():
            for i, t in enumerate(self.tables):
                ebc.embedding_bags[t.name].weight.copy_(self.table_weight(i))
        return ebc


_BAG_GATHER_MIN = 32768   # ids (~840 rows of Criteo's 39 features)


def _gather(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """weight[idx] without autograd (scoring): [len(idx), D]."""
    if weight.shape[1] == 1:   # (a [N, 1] table gathers ~3x faster as a flat vector)
        return weight.view(-1).index_select(0, idx).view(-1, 1)
    n = idx.numel()   # (a symbolic size while torch.export traces: the program is a server's)
    if weight.device.type != "cpu" or not isinstance(n, int) or n < _BAG_GATHER_MIN:
        return weight.index_select(0, idx)
    # A large batch on CPU (file scoring): embedding_bag's kernel (fbgemm's; bags of one id, the
    # same values) prefetches the rows index_select waits for, DeepFM's forward ~1.05-1.1x at
    # 4096 rows. Small ones, and the exported program (a server's batches), are 4-8 % faster
    # with index_select: up to 512 rows it is the quicker (bench/RESULTS.md "Serving").
    offsets = torch.arange(n + 1, device=idx.device)
    return F.embedding_bag(idx, weight, offsets, mode="sum", include_last_offset=True)


def _one_id_per_bag(kjt: KeyedJaggedTensor, n_bags: int, facts: BatchFacts) -> bool:
    """Whether every (sample, feature) bag holds exactly one id (kept in the batch's facts)."""
    if facts.one_per_bag is None:
        facts.one_per_bag = kjt.values().numel() == n_bags and bool((kjt.lengths() == 1).all())
    return facts.one_per_bag


class _GatherRows(torch.autograd.Function):
    """rows[inverse] with a segment-sum backward: each distinct row's gradient is one bag of an
    `embedding_bag` over the positions that used it (~4x faster on CPU than index_add)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, ids: DistinctIds) -> torch.Tensor:  # type: ignore[override]
        ctx.ids = ids
        return rows.index_select(0, ids.inverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ids = ctx.ids
        # (On an H100 this kernel took 0.46 ms per call, half of the step's GPU time, but the
        # step there is bound by kernel launches on the host: an index_add_ backward did not
        # make it faster in the runs of 2026-11-26.)
        g = F.embedding_bag(ids.order, grad.reshape(ids.order.numel(), -1), ids.offsets,
                            mode="sum", include_last_offset=True)
        return g, None


def table_config(name: str, feature: str, rows: int, dim: int,
                 pooling: str = "sum") -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows,
                              feature_names=[feature],
                              pooling=PoolingType.MEAN if pooling == "mean" else PoolingType.SUM)
