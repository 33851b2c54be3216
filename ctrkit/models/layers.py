"""Building blocks shared by the model zoo."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer, then a linear output."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int = 1, dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        layers = []
        for h in hidden:
            layers.append(nn.Linear(in_dim, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_dim = h
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """Second-order FM term sum_{i<j} <e_i, e_j> for emb [B, F, D], in O(F·D)."""
    s = emb.sum(dim=1)
    return 0.5 * (s.square() - emb.square().sum(dim=1)).sum(dim=1)
