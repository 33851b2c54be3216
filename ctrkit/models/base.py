"""Shared plumbing of embedding-based CTR models: tables from the schema, grouped by dimension."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctrkit.data.batch import current_facts
from ctrkit.data.schema import Schema
from ctrkit.errors import ConfigError
from ctrkit.models.embedding import BatchedEmbeddingBags, table_config


class FieldEmbeddings(nn.Module):
    """One embedding table per categorical feature; per-feature dimensions allowed.

    Tables of equal dimension share one `BatchedEmbeddingBags`. `forward(sparse)` returns
    {dim: [B, F_d, D]} with the features of each group in schema order (`self.groups[dim]` lists
    them); the batch's facts (ctrkit/data/batch.py `batch_facts`) reach the table modules.
    """

    def __init__(self, schema: Schema, dim: int, overrides: Optional[Mapping[str, int]] = None,
                 suffix: str = "", init_std: float = 1e-4) -> None:
        super().__init__()
        overrides = dict(overrides or {})
        names = [f.name for f in schema.sparse]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ConfigError(f"model.embedding_dims: unknown features {unknown}")
        self.groups: Dict[int, List[str]] = {}
        tables: Dict[int, list] = {}
        for f in schema.sparse:
            d = int(overrides.get(f.name, dim))
            self.groups.setdefault(d, []).append(f.name)
            tables.setdefault(d, []).append(table_config(f.name + suffix, f.name, f.vocab_size, d,
                                                         f.pooling))
        self.bags = nn.ModuleDict({str(d): BatchedEmbeddingBags(t, init_std=init_std)
                                   for d, t in tables.items()})

    def forward(self, sparse: KeyedJaggedTensor) -> Dict[int, torch.Tensor]:
        facts = current_facts()
        return {int(d): bag(sparse, facts) for d, bag in self.bags.items()}


def dense_width(schema: Schema) -> int:
    return len(schema.dense)
