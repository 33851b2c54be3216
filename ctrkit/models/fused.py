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

from ctrkit.config import SparseOptConfig
from ctrkit.data.batch import BatchFacts
from ctrkit.models.embedding import BatchedEmbeddingBags, FeatureSelector, TableModule

FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


class FusedEmbeddingBags(TableModule):
    """Same interface as `BatchedEmbeddingBags` (`forward(kjt) -> [B, T, D]`), fused update."""

    def __init__(self, source: BatchedEmbeddingBags, opt: SparseOptConfig,
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, EmbeddingLocation, SplitTableBatchedEmbeddingBagsCodegen)
        kind = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                "adagrad": EmbOptimType.EXACT_ADAGRAD, "sgd": EmbOptimType.EXACT_SGD}[opt.name]
        self.tables = source.tables
        self.feature_names = source.feature_names
        self.embedding_dim = source.embedding_dim
        self.select = FeatureSelector(self.feature_names)
        # On a GPU the tables live in its memory (fbgemm's CUDA build); on the CPU in host memory.
        where = ((EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device.type == "cuda"
                 else (EmbeddingLocation.HOST, ComputeDevice.CPU))
        specs = [(t.num_embeddings, t.embedding_dim, *where) for t in source.tables]
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=specs, optimizer=kind, learning_rate=opt.lr, eps=opt.eps,
            weight_decay=opt.weight_decay, device=device,
            pooling_mode=PoolingMode.SUM if source.mode == "sum" else PoolingMode.MEAN)
        with torch.no_grad():
            for i, w in enumerate(self.tbe.split_embedding_weights()):
                w.copy_(source.table_weight(i))
        # fbgemm keeps weights and optimizer state in buffers named by where the tables live
        # (weights_host on the CPU, weights_dev on a GPU): the state dict holds them per table
        # instead, so a checkpoint loads on either device.
        self._register_state_dict_hook(_per_table_state)
        self.register_load_state_dict_pre_hook(_load_per_table_state)

    def forward(self, kjt: KeyedJaggedTensor, facts: Optional[BatchFacts] = None) -> torch.Tensor:
        kjt, _ = self.select(kjt, facts if facts is not None else BatchFacts())
        out = self.tbe(kjt.values().to(torch.int64), kjt.offsets().to(torch.int64))
        return out.view(kjt.stride(), len(self.tables), self.embedding_dim)

    def set_learning_rate(self, lr: float) -> None:
        self.tbe.set_learning_rate(lr)

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


def fuse_embeddings(model: nn.Module, opt: SparseOptConfig,
                    device: torch.device = torch.device("cpu")) -> nn.Module:
    """Replace the model's BatchedEmbeddingBags by FusedEmbeddingBags (in place).

    fbgemm's TBE needs dimensions that are multiples of 4; other tables (e.g. first-order weights of
    dimension 1) stay row-sparse and get the same optimizer from `build_optimizers`.
    """
    replace: Dict[str, BatchedEmbeddingBags] = {
        n: m for n, m in model.named_modules()
        if isinstance(m, BatchedEmbeddingBags) and m.embedding_dim % 4 == 0}
    for name, module in replace.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedEmbeddingBags(module, opt, device)) if not isinstance(parent, nn.ModuleDict) \
            else parent.__setitem__(child, FusedEmbeddingBags(module, opt, device))
    return model
