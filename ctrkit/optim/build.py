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
    # Sharded tables (ctrkit.distributed.sharding): this rank's shards, updated row-sparsely.
    sparse += [p for m in model.modules() for p in getattr(m, "sharded_tables", ())]
    ids = {id(p) for p in sparse}
    # fbgemm TBE modules update themselves inside backward: no optimizer owns their tensors.
    ids |= {id(p) for m in model.modules() if isinstance(m, FusedEmbeddingBags) for p in m.parameters()}
    dense = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    return sparse, dense


def worker_lr_scale(rule: str, algorithm: str, workers: int, dense_adaptive: bool = True,
                    tables_adaptive: bool = True) -> Tuple[float, float]:
    """(dense, tables) learning-rate factors for n workers with a fixed per-worker batch.

    `none` is 1; `sqrt` and `linear` scale both parts by n^0.5 or n. `auto` picks by algorithm
    and by whether each part's optimizer is Adam-type (`dense_adaptive`, `tables_adaptive`):
    - SGD (dpsgd, which always steps with SGD, or allreduce with SGD): linear, the rate of the
      linear-speedup analyses;
    - allreduce, Adam-type: sqrt. Averaging n gradients also shrinks Adam's denominator; the
      linear rate was ahead in the reference data's short runs and behind in the scaling
      study's longer ones;
    - damsgrad/choco, Adam-type: min(sqrt(n), 2) on both parts. Each worker's step is normalised
      by one worker's second moment, and a larger step grows the distance between replicas on a
      sparse graph.
    `local` and a single worker: 1. The runs behind `auto` are in bench/results/damsgrad_gap/
    (the reference data; summary.json lists them) and bench/results/scaling/ (synthetic data;
    bench/RESULTS.md says what that older study can and cannot show); the rule is
    docs/decentralized.md's.
    """
    if workers <= 1 or rule == "none" or algorithm == "local":
        return 1.0, 1.0
    sqrt, linear = float(workers) ** 0.5, float(workers)
    if rule != "auto":
        f = sqrt if rule == "sqrt" else linear
        return f, f
    if algorithm == "dpsgd":   # plain SGD steps, whatever optimizer the config names
        return linear, linear
    if algorithm == "allreduce":
        return (sqrt if dense_adaptive else linear), (sqrt if tables_adaptive else linear)
    gossip = min(sqrt, 2.0)
    return (gossip if dense_adaptive else linear), (gossip if tables_adaptive else linear)


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
