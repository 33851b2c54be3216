"""Shard groups: k ranks hold one copy of the tables, split by torchrec, and act as one worker.

`in_shard_groups(strategy)` is that strategy run by shard groups (ctrkit/distributed/sharding.py):
the model is built on the host and its tables sharded within the group before the optimizers
exist; the dense gradients are averaged over the group after backward (torchrec already divides
the tables' gradients by k); a group evaluates its model together, and group 0 evaluates the
network average. Rank g*k + p gossips with rank h*k + p of each neighbouring group h.
"""
from __future__ import annotations

import functools
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from ctrkit.comm.topology import Topology
from ctrkit.distributed.sharding import (average_dense_grads, evaluate_sharded, lift_topology,
                                         make_grid, shard_model)
from ctrkit.errors import CtrkitError


class ShardGroups:
    """Mixin over a strategy that takes shard groups (`takes_shard_groups`)."""

    @property
    def model_device(self) -> torch.device:
        return torch.device("cpu")   # only the shards go to the GPU

    @property
    def group_size(self) -> int:
        return self.grid.k

    def place(self, model: nn.Module) -> None:
        env, device = self.env, self.env.device
        backend = dist.get_backend()
        if device.type == "cuda" and (backend != "nccl" or self.cfg.train.device.startswith("cuda:")):
            raise CtrkitError("sharded tables on GPUs need one GPU per rank with NCCL "
                              f"(train.device=cuda or auto, not {self.cfg.train.device} with {backend})")
        self.grid = make_grid(env.rank, env.world, self.cfg.distributed.shard_group_size,
                              "cuda" if backend == "nccl" else "cpu")
        plans = shard_model(model, self.grid, backend, device)
        model.to(device)
        if env.is_main:
            print(f"ctrkit: {self.grid.groups} shard groups of {self.grid.k} ranks; rank g*k+p "
                  "gossips with rank h*k+p of neighbouring groups h\n" + "\n".join(plans), flush=True)

    def gossip_graph(self, topology: Topology) -> Topology:
        return lift_topology(topology, self.grid.k)

    def after_backward(self, model: nn.Module) -> None:
        average_dense_grads(model, self.grid)
        super().after_backward(model)

    @property
    def evaluates_average(self) -> bool:
        return self.env.is_main or self.grid.group == 0

    def evaluate(self, model: nn.Module, split: str, loader) -> dict:
        """The shard group's model on the whole split (every member runs the forwards)."""
        return evaluate_sharded(model, loader.schema, split, loader.batch_size, self.grid,
                                loader.prefetch)

    def summary(self, model: nn.Module, steps: int) -> Dict[str, object]:
        return {**super().summary(model, steps), "shard_group_size": self.grid.k,
                "embedding_bytes_per_rank": model.embedding_bytes_per_rank}


@functools.lru_cache(maxsize=None)
def in_shard_groups(strategy: type) -> type:
    """`strategy` run by shard groups (one class per strategy)."""
    return type(f"{strategy.__name__}InShardGroups", (ShardGroups, strategy), {})
