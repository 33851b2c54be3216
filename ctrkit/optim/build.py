"""Optimizers from config: row-sparse lazy optimizer for embedding tables, a dense one for the rest."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ctrkit.config import OptimizerConfig
from ctrkit.errors import ConfigError
from ctrkit.models.embedding import TableModule
from ctrkit.optim.sparse import RowSparseAdagrad, RowSparseAdam, RowSparseSGD


def _sparse_groups(model: nn.Module, base_lr: float, overrides: Dict[str, float]) -> List[dict]:
    """One param group per learning rate: tables under a module path in `overrides` get its lr."""
    names = [n for n, m in model.named_modules()]
    unknown = [k for k in overrides if not any(n == k or n.startswith(k + ".") for n in names)]
    if unknown:
        raise ConfigError(f"optimizer.sparse.lr_overrides: no module named '{unknown[0]}' in the model")
    groups: Dict[float, List[nn.Parameter]] = {}
    for name, m in model.named_modules():
        if isinstance(m, TableModule):
            lr = next((v for k, v in overrides.items() if name == k or name.startswith(k + ".")), base_lr)
            for p in m.row_sparse_parameters():
                groups.setdefault(lr, []).append(p)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]


def split_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(embedding-table weights with row-sparse gradients, all other parameters). The tables of a
    module that updates itself inside backward (fbgemm's fused TBE) are in neither."""
    tables = [m for m in model.modules() if isinstance(m, TableModule)]
    sparse = [p for m in tables for p in m.row_sparse_parameters()]
    owned = {id(p) for m in tables for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in owned and p.requires_grad]
    return sparse, dense


@dataclass(frozen=True)
class LearningRates:
    """The learning rates the optimizers start from: the configured ones, or those times the
    factors of `distributed.lr_scaling` for the number of workers (ctrkit/strategies/lr_scaling.py).
    `scale` is the (dense, tables) factor applied."""
    dense: float
    tables: float
    table_overrides: Dict[str, float] = field(default_factory=dict)
    scale: Tuple[float, float] = (1.0, 1.0)

    @classmethod
    def of(cls, cfg: OptimizerConfig) -> "LearningRates":
        return cls(cfg.dense.lr, cfg.sparse.lr, dict(cfg.sparse.lr_overrides))

    def scaled(self, dense: float, tables: float) -> "LearningRates":
        if (dense, tables) == (1.0, 1.0):
            return self
        return LearningRates(self.dense * dense, self.tables * tables,
                             {k: v * tables for k, v in self.table_overrides.items()},
                             (self.scale[0] * dense, self.scale[1] * tables))


def build_optimizers(model: nn.Module, cfg: OptimizerConfig,
                     rates: Optional[LearningRates] = None) -> List[torch.optim.Optimizer]:
    """A dense optimizer and a row-sparse one for the tables, at `rates` (default: the
    configured learning rates)."""
    rates = rates or LearningRates.of(cfg)
    sparse, dense = split_parameters(model)
    opts: List[torch.optim.Optimizer] = []
    if dense:
        d, lr = cfg.dense, rates.dense
        if d.name in ("adam", "adamw"):
            cls = torch.optim.AdamW if d.name == "adamw" else torch.optim.Adam
            opts.append(cls(dense, lr=lr, betas=tuple(d.betas), eps=d.eps,
                            weight_decay=d.weight_decay, fused=True))
        elif d.name == "sgd":
            opts.append(torch.optim.SGD(dense, lr=lr, weight_decay=d.weight_decay))
        else:
            opts.append(torch.optim.Adagrad(dense, lr=lr, weight_decay=d.weight_decay, eps=d.eps))
    if sparse:
        s, lr = cfg.sparse, rates.tables
        sparse = _sparse_groups(model, lr, rates.table_overrides)
        if s.name in ("adam", "amsgrad"):
            opts.append(RowSparseAdam(sparse, lr=lr, betas=tuple(s.betas), eps=s.eps,
                                      weight_decay=s.weight_decay, amsgrad=s.name == "amsgrad",
                                      rowwise=s.rowwise))
        elif s.name in ("rowwise_adagrad", "adagrad"):
            opts.append(RowSparseAdagrad(sparse, lr=lr, eps=s.eps, weight_decay=s.weight_decay,
                                         rowwise=s.name == "rowwise_adagrad"))
        else:
            opts.append(RowSparseSGD(sparse, lr=lr, weight_decay=s.weight_decay))
    return opts + fused_optimizers(model, rates.tables)


def fused_optimizers(model: nn.Module, lr: float) -> List[torch.optim.Optimizer]:
    """The `fused_optimizer` of each table module that updates itself inside backward (fbgemm's
    TBE), starting at `lr`."""
    out = [m.fused_optimizer for m in model.modules()
           if isinstance(m, TableModule) and m.fused_optimizer is not None]
    for o in out:
        for g in o.param_groups:
            g["lr"] = lr
    return out
