"""fbgemm's table-batched embedding (TBE) with the optimizer fused into backward.

The fast path where fbgemm's CPU optimizers fit (row-wise Adagrad, Adagrad, SGD — its CPU build has
no Adam): one kernel looks up all tables and one kernel updates the touched rows during backward,
so no gradient tensor is materialised at all. `fuse_embeddings` swaps it in for a model's
`BatchedEmbeddingBags`, starting from their weights.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctrkit.data.batch import BatchFacts
from ctrkit.models.embedding import BatchedEmbeddingBags, FeatureSelector, TableModule

FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


class FusedTableOptimizer(torch.optim.Optimizer):
    """The ordinary optimizer face of tables that update themselves inside backward (as torchrec's
    fused tables expose `fused_optimizer`): one param group whose `lr` schedules and LR-on-plateau
    change like any other's, and which the next backward uses; `step()` has nothing left to do.
    Its state (fbgemm's momentum) is saved with the module's state dict, per table."""

    def __init__(self, module: "FusedEmbeddingBags", lr: float) -> None:
        super().__init__([module.tbe.weights_host if module.tbe.weights_host.numel()
                          else module.tbe.weights_dev], {"lr": lr})

    def step(self, closure=None):   # noqa: D102 - the update ran inside backward
        return None


class FusedEmbeddingBags(TableModule):
    """Same interface as `BatchedEmbeddingBags` (`forward(kjt) -> [B, T, D]`), updated inside
    backward by fbgemm's `optimizer` (rowwise_adagrad, adagrad or sgd) at the learning rate of
    `fused_optimizer`."""

    def __init__(self, source: BatchedEmbeddingBags, optimizer: str, lr: float, eps: float = 1e-8,
                 weight_decay: float = 0.0, device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        if optimizer not in FUSED_OPTIMIZERS:
            raise ValueError(f"fused tables: optimizer {optimizer!r} is not one of fbgemm's CPU "
                             f"optimizers ({', '.join(FUSED_OPTIMIZERS)})")
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen)
        kind = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                "adagrad": EmbOptimType.EXACT_ADAGRAD, "sgd": EmbOptimType.EXACT_SGD}[optimizer]
        self.tables = source.tables
        self.feature_names = source.feature_names
        self.embedding_dim = source.embedding_dim
        self.select = FeatureSelector(self.feature_names)
        # On a GPU the tables live in its memory (fbgemm's CUDA build); on the CPU in host memory.
        where = ((EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device.type == "cuda"
                 else (EmbeddingLocation.HOST, ComputeDevice.CPU))
        specs = [(t.num_embeddings, t.embedding_dim, *where) for t in source.tables]
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=specs, optimizer=kind, learning_rate=lr, eps=eps,
            weight_decay=weight_decay, device=device,
            pooling_mode=PoolingMode.SUM if source.mode == "sum" else PoolingMode.MEAN)
        with torch.no_grad():
            for i, w in enumerate(self.tbe.split_embedding_weights()):
                w.copy_(source.table_weight(i))
        # fbgemm keeps weights and optimizer state in buffers named by where the tables live
        # (weights_host on the CPU, weights_dev on a GPU): the state dict holds them per table
        # instead, so a checkpoint loads on either device.
        self._register_state_dict_hook(_per_table_state)
        self.register_load_state_dict_pre_hook(_load_per_table_state)
        self._tbe_lr = lr
        self.fused_optimizer = FusedTableOptimizer(self, lr)

    def forward(self, kjt: KeyedJaggedTensor, facts: Optional[BatchFacts] = None) -> torch.Tensor:
        kjt, _ = self.select(kjt, facts if facts is not None else BatchFacts())
        lr = self.fused_optimizer.param_groups[0]["lr"]
        if lr != self._tbe_lr:   # the rate this step's backward updates with
            self.tbe.set_learning_rate(lr)
            self._tbe_lr = lr
        out = self.tbe(kjt.values().to(torch.int64), kjt.offsets().to(torch.int64))
        return out.view(kjt.stride(), len(self.tables), self.embedding_dim)

    def table_weight(self, i: int) -> torch.Tensor:
        return self.tbe.split_embedding_weights()[i]


def _per_table_state(module: "FusedEmbeddingBags", state: dict, prefix: str, _meta) -> None:
    """state_dict hook: `weight.<table>` [rows, dim] and `optimizer.<table>.<j>` instead of
    fbgemm's placement-specific flat buffers."""
    for k in [k for k in state if k.startswith(prefix + "tbe.")]:
        del state[k]
    opt = module.tbe.split_optimizer_states()
    for i, (t, w) in enumerate(zip(module.tables, module.tbe.split_embedding_weights())):
        state[f"{prefix}weight.{t.name}"] = w.detach()
        for j, s in enumerate(opt[i]):
            state[f"{prefix}optimizer.{t.name}.{j}"] = s.detach()


def _load_per_table_state(module: "FusedEmbeddingBags", state: dict, prefix: str, *_args) -> None:
    """load_state_dict pre-hook: copy the per-table entries into fbgemm's buffers on whatever
    device they live, then hand the child its own buffers (a no-op load for it)."""
    if not any(k.startswith(prefix + "weight.") for k in state):
        return   # fbgemm's own layout (older checkpoints): the child loads it
    opt = module.tbe.split_optimizer_states()
    with torch.no_grad():
        for i, (t, w) in enumerate(zip(module.tables, module.tbe.split_embedding_weights())):
            key = f"{prefix}weight.{t.name}"
            if key in state:
                w.copy_(state.pop(key))
            for j, s in enumerate(opt[i]):
                key = f"{prefix}optimizer.{t.name}.{j}"
                if key in state:
                    s.copy_(state.pop(key).view_as(s))
    for k, v in module.tbe.state_dict().items():
        state[f"{prefix}tbe.{k}"] = v


def fuse_embeddings(model: nn.Module, optimizer: str, lr: float, eps: float = 1e-8,
                    weight_decay: float = 0.0,
                    device: torch.device = torch.device("cpu")) -> nn.Module:
    """Replace the model's BatchedEmbeddingBags by FusedEmbeddingBags (in place).

    fbgemm's TBE needs dimensions that are multiples of 4; other tables (e.g. first-order weights of
    dimension 1) stay row-sparse and get the same optimizer from `build_optimizers`, which also
    lists each fused module's `fused_optimizer`.
    """
    replace: Dict[str, BatchedEmbeddingBags] = {
        n: m for n, m in model.named_modules()
        if isinstance(m, BatchedEmbeddingBags) and m.embedding_dim % 4 == 0
        and not m.mean_tables}   # (fbgemm pools every table of a TBE the same way)
    for name, module in replace.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fused = FusedEmbeddingBags(module, optimizer, lr, eps, weight_decay, device)
        if isinstance(parent, nn.ModuleDict):
            parent[child] = fused
        else:
            setattr(parent, child, fused)
    return model
