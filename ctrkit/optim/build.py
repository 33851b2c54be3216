"""Optimizers from config: row-sparse lazy optimizer for embedding tables, a dense one for the rest."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from ctrkit.config import OptimizerConfig
from ctrkit.errors import ConfigError
from ctrkit.models.embedding import BatchedEmbeddingBags
from ctrkit.models.fused import FusedEmbeddingBags
from ctrkit.optim.sparse import RowSparseAdagrad, RowSparseAdam, RowSparseSGD


def _sparse_groups(model: nn.Module, base_lr: float, overrides: Dict[str, float]) -> List[dict]:
    """One param group per learning rate: tables under a module path in `overrides` get its lr."""
    names = [n for n, m in model.named_modules()]
    unknown = [k for k in overrides if not any(n == k or n.startswith(k + ".") for n in names)]
    if unknown:
        raise ConfigError(f"optimizer.sparse.lr_overrides: no module named '{unknown[0]}' in the model")
    groups: Dict[float, List[nn.Parameter]] = {}
    for name, m in model.named_modules():
        if isinstance(m, BatchedEmbeddingBags):
            lr = next((v for k, v in overrides.items() if name == k or name.startswith(k + ".")), base_lr)
            groups.setdefault(lr, []).append(m.weight)
    return [{"params": ps, "lr": lr} for lr, ps in groups.items()]


def split_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(embedding-table weights with row-sparse gradients, all other parameters)."""
    sparse = [m.weight for m in model.modules() if isinstance(m, BatchedEmbeddingBags)]
    ids = {id(p) for p in sparse}
    # fbgemm TBE modules update themselves inside backward: no optimizer owns their tensors.
    ids |= {id(p) for m in model.modules() if isinstance(m, FusedEmbeddingBags) for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return sparse, dense


def worker_lr_scale(rule: str, algorithm: str, workers: int, adaptive: bool = True) -> float:
    """Learning-rate factor for n workers with a fixed per-worker batch.

    allreduce averages gradients over n batches: for SGD the lr scales linearly; for Adam the
    gradient noise also shrinks the denominator, so the square-root rule matches it. dpsgd and
    damsgrad average n *steps*, each normalised by a worker's own (per-batch) second moment: the
    mean step's drift does not grow with n at a fixed lr, only its noise shrinks by sqrt(n), so
    n-fold progress per step needs an n-fold lr (the rate in the linear-speedup analyses)."""
    if workers <= 1 or rule == "none" or algorithm == "local":
        return 1.0
    if rule == "auto":
        rule = "sqrt" if (algorithm == "allreduce" and adaptive) else "linear"
    return float(workers) ** (0.5 if rule == "sqrt" else 1.0)


def build_optimizers(model: nn.Module, cfg: OptimizerConfig) -> List[torch.optim.Optimizer]:
    sparse, dense = split_parameters(model)
    opts: List[torch.optim.Optimizer] = []
    if dense:
        d = cfg.dense
        if d.name in ("adam", "adamw"):
            cls = torch.optim.AdamW if d.name == "adamw" else torch.optim.Adam
            opts.append(cls(dense, lr=d.lr, betas=tuple(d.betas), eps=d.eps,
                            weight_decay=d.weight_decay, fused=True))
        elif d.name == "sgd":
            opts.append(torch.optim.SGD(dense, lr=d.lr, weight_decay=d.weight_decay))
        else:
            opts.append(torch.optim.Adagrad(dense, lr=d.lr, weight_decay=d.weight_decay, eps=d.eps))
    if sparse:
        s = cfg.sparse
        sparse = _sparse_groups(model, s.lr, s.lr_overrides)
        if s.name in ("adam", "amsgrad"):
            opts.append(RowSparseAdam(sparse, lr=s.lr, betas=tuple(s.betas), eps=s.eps,
                                      weight_decay=s.weight_decay, amsgrad=s.name == "amsgrad",
                                      rowwise=s.rowwise))
        elif s.name in ("rowwise_adagrad", "adagrad"):
            opts.append(RowSparseAdagrad(sparse, lr=s.lr, eps=s.eps, weight_decay=s.weight_decay,
                                         rowwise=s.name == "rowwise_adagrad"))
        else:
            opts.append(RowSparseSGD(sparse, lr=s.lr, weight_decay=s.weight_decay))
    return opts
