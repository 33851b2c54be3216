"""Logistic regression, FM and DeepFM. Each `forward(dense [B, Dn], sparse KJT)` returns logits [B]."""
from __future__ import annotations

from typing import Annotated, Mapping, Optional, Sequence

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import nn
from torchrec import KeyedJaggedTensor

from ctrkit.data.schema import Schema
from ctrkit.errors import ConfigError
from ctrkit.models.base import FieldEmbeddings, dense_width
from ctrkit.models.layers import MLP, fm_interaction
from ctrkit.models.registry import register_model

# The constructors' annotations are checked when the config loads (registry.constructor_arguments).
Dropout = Annotated[float, Field(ge=0, lt=1)]


class _FirstOrder(nn.Module):
    """Bias + one weight per categorical id + a linear term on dense features."""

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.weights = FieldEmbeddings(schema, 1, suffix="__w", init_std=1e-4) if schema.sparse else None
        self.dense = nn.Linear(dense_width(schema), 1) if schema.dense else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        out = self.bias.expand(dense.shape[0])
        if self.weights is not None:
            out = out + self.weights(sparse)[1].sum(dim=(1, 2))
        if self.dense is not None:
            out = out + self.dense(dense).squeeze(1)
        return out


@register_model("lr")
class LogisticRegression(nn.Module):
    """Logistic regression on one-hot categorical ids and dense features."""

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        self.linear = _FirstOrder(schema)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return self.linear(dense, sparse)


@register_model("fm")
class FM(nn.Module):
    """Factorization machine: first order + pairwise interactions of field embeddings.
    `init_std` > 0: from all-zero embeddings the pairwise term's gradient is zero, they never move."""

    def __init__(self, schema: Schema, embedding_dim: PositiveInt = 16,
                 init_std: PositiveFloat = 1e-4) -> None:
        super().__init__()
        if not schema.sparse:
            raise ConfigError("model fm needs categorical features")
        self.linear = _FirstOrder(schema)
        self.embedding = FieldEmbeddings(schema, embedding_dim, init_std=init_std)
        self.dim = embedding_dim

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        e = self.embedding(sparse)[self.dim]
        return self.linear(dense, sparse) + fm_interaction(e)


@register_model("deepfm")
class DeepFM(nn.Module):
    """DeepFM (Guo et al. 2017): first order + FM over field embeddings + MLP over embeddings and
    dense features, all sharing the embeddings. Features with an overridden dimension
    (`embedding_dims`) feed the MLP only: FM needs one common dimension."""

    def __init__(self, schema: Schema, embedding_dim: PositiveInt = 16,
                 hidden_units: Sequence[PositiveInt] = (400, 400, 400), dropout: Dropout = 0.0,
                 batch_norm: bool = False, embedding_dims: Optional[Mapping[str, PositiveInt]] = None,
                 init_std: NonNegativeFloat = 1e-4) -> None:
        super().__init__()
        if not schema.sparse:
            raise ConfigError("model deepfm needs categorical features")
        self.linear = _FirstOrder(schema)
        self.embedding = FieldEmbeddings(schema, embedding_dim, embedding_dims, init_std=init_std)
        self.dim = embedding_dim
        width = sum(d * len(names) for d, names in self.embedding.groups.items())
        self.mlp = MLP(width, list(hidden_units), 1, dropout=dropout, batch_norm=batch_norm,
                       side_dim=dense_width(schema))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        groups = self.embedding(sparse)
        b = dense.shape[0]
        parts = [groups[d].reshape(b, -1) for d in sorted(groups)]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        deep = self.mlp(x, dense if self.mlp.side is not None else None).squeeze(1)
        fm = fm_interaction(groups[self.dim]) if self.dim in groups else 0.0
        return self.linear(dense, sparse) + fm + deep
