"""Sharded embedding tables inside shard groups, decentralized replicas across groups (DESIGN.md).

Ranks form a grid. Shard group g is ranks [g*k, (g+1)*k): together they hold one copy of the
tables, split among them by torchrec's planner (table-wise or column-wise; the kernels are
torchrec's non-fused "dense" ones, because the decentralized optimizer needs the gradients).
The n/k groups are the decentralized workers: rank g*k + p gossips only with rank h*k + p of each
neighbouring group h, which holds the same shard. Contiguous groups keep the all-to-alls of a
group on one machine under torchrun. k = 1 is plain replication; k = n is pure model parallelism.

Inside a group every rank feeds its own batch; torchrec's all-to-alls route ids to the shard
owners and divide the table gradients by k, and the dense gradients are averaged over the group,
so a group takes exactly the step of one worker fed the union of its members' batches.
"""
from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from ctrkit.comm.device import comm_device
from ctrkit.comm.topology import Topology
from ctrkit.data.loader import BatchLoader
from ctrkit.errors import ConfigError
from ctrkit.metrics import auc_logloss
from ctrkit.models.embedding import BatchedEmbeddingBags, TableModule
from ctrkit.optim.build import split_parameters
from ctrkit.optim.decentralized import average_dense_gradients

SHARDING_TYPES_GLOO = ("table_wise", "column_wise")
SHARDING_TYPES_NCCL = ("table_wise", "column_wise", "row_wise")


@dataclass
class ShardGrid:
    """This rank's place in the (replica x shard) grid: a torch DeviceMesh whose "shard" dimension
    is this rank's shard group (k contiguous ranks) and whose "replicate" dimension is the ranks
    holding the same shard, one per group."""
    rank: int
    world: int
    k: int                       # ranks per shard group
    mesh: object = None          # torch.distributed.device_mesh.DeviceMesh

    @property
    def group(self) -> int:
        return self.rank // self.k

    @property
    def pos(self) -> int:
        return self.rank % self.k

    @property
    def groups(self) -> int:
        return self.world // self.k

    @property
    def shard_pg(self) -> dist.ProcessGroup:
        return self.mesh.get_group("shard")

    @property
    def replica_pg(self) -> dist.ProcessGroup:
        return self.mesh.get_group("replicate")

    def env(self):
        """torchrec's 2-D sharding environment: ranks and sizes relative to the shard group."""
        from torchrec.distributed.types import ShardingEnv2D
        env = ShardingEnv2D(sharding_pg=self.shard_pg, replica_pg=self.replica_pg,
                            global_pg=dist.group.WORLD, device_mesh=self.mesh,
                            node_group_size=self.k, use_inter_host_allreduce=True)
        # ShardedTensors, not DTensors: torchrec's table-wise DTensors claim Replicate() with
        # empty local tensors on the ranks without the table, which a checkpoint cannot reshard.
        env.output_dtensor = False
        return env


def check_grid(world: int, k: int) -> None:
    if k < 1 or world % k:
        raise ConfigError(f"distributed.shard_group_size={k} must divide the number of workers "
                          f"({world})")


def make_grid(rank: int, world: int, k: int, device: str = "cpu") -> ShardGrid:
    """The DeviceMesh (world/k groups x k shards); every rank must call this."""
    from torch.distributed.device_mesh import DeviceMesh
    check_grid(world, k)
    mesh = DeviceMesh(device, torch.arange(world).view(world // k, k),
                      mesh_dim_names=("replicate", "shard"))
    return ShardGrid(rank, world, k, mesh)


def _plan_for_group(plan, grid: ShardGrid, device: torch.device = torch.device("cpu")):
    """The group plan with its ranks 0..k-1 renamed to this group's global ranks (torchrec's 2-D
    environment and its ShardedTensors name shards by global rank)."""
    import copy
    from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
    from torch.distributed.remote_device import _remote_device
    plan = copy.deepcopy(plan)
    base = grid.group * grid.k
    for ps in plan.values():
        ps.ranks = [base + r for r in ps.ranks]
        if isinstance(ps.sharding_spec, EnumerableShardingSpec):
            for sh in ps.sharding_spec.shards:
                r = base + sh.placement.rank()
                sh.placement = _remote_device(f"rank:{r}/{_rank_device(r, device)}")
    return plan


def _rank_device(rank: int, device: torch.device) -> str:
    """The device a global rank computes on: the host, or under torchrun the GPU of its local
    rank (ranks fill nodes in order, LOCAL_WORLD_SIZE per node)."""
    if device.type != "cuda":
        return "cpu"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return f"cuda:{rank % per_node}"


def lift_topology(groups: Topology, k: int) -> Topology:
    """The gossip graph over ranks: group topology copied once per shard position (rank g*k+p
    mixes with h*k+p with the groups' weight W[g, h]). It is k disconnected copies by design."""
    n = groups.n * k
    w = np.zeros((n, n))
    nbrs: List[Tuple[int, ...]] = []
    for r in range(n):
        g, p = divmod(r, k)
        nbrs.append(tuple(h * k + p for h in groups.neighbors[g]))
        w[r, r] = groups.weights[g, g]
        for h in groups.neighbors[g]:
            w[r, h * k + p] = groups.weights[g, h]
    return Topology(groups.name, n, tuple(nbrs), w)


def _sharder():
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    return EmbeddingBagCollectionSharder()


def plan_tables(tables: List[EmbeddingBagConfig], k: int, backend: str = "gloo"):
    """torchrec's planner places the tables on the k ranks of a shard group; the kernels are then
    switched to the non-fused "dense" kernel (the planner offers only fused ones on CPU, and fused
    kernels update inside backward, so no gradient would reach the decentralized optimizer).

    Rank 0 plans and broadcasts, so that every group holds the same layout (the planner's choice
    between equal-cost options is not guaranteed to be the same in every process)."""
    from torchrec.distributed.planner import (EmbeddingShardingPlanner, ParameterConstraints,
                                              Topology as PlanTopology)
    types = list(SHARDING_TYPES_NCCL if backend == "nccl" else SHARDING_TYPES_GLOO)
    device = "cuda" if backend == "nccl" else "cpu"
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    planner = EmbeddingShardingPlanner(
        topology=PlanTopology(world_size=k, compute_device=device, local_world_size=k),
        constraints={t.name: ParameterConstraints(sharding_types=types, compute_kernels=["fused"])
                     for t in tables})
    plan = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        plan = planner.plan(ebc, [_sharder()]).plan[""]
        for ps in plan.values():
            ps.compute_kernel = "dense"
    if dist.is_initialized():
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        plan = box[0]
    return plan


def describe_plan(name: str, plan, tables: List[EmbeddingBagConfig], k: int) -> Tuple[str, List[int]]:
    """Which table lives on which rank of a shard group, and the embedding bytes per rank."""
    per_rank = [0] * k
    lines = [f"{name}: {len(tables)} tables over {k} ranks"]
    by_name = {t.name: t for t in tables}
    for tname, ps in plan.items():
        parts = []
        for sh in ps.sharding_spec.shards:
            r = sh.placement.rank()
            rows, cols = sh.shard_sizes
            per_rank[r] += rows * cols * 4
            parts.append(f"rank {r}: {rows}x{cols} @ {list(sh.shard_offsets)}")
        t = by_name[tname]
        lines.append(f"  {tname} ({t.num_embeddings}x{t.embedding_dim}) {ps.sharding_type}: "
                     + "; ".join(parts))
    lines.append("  bytes per rank: " + ", ".join(f"{r}: {b / 2**20:.1f} MB"
                                                  for r, b in enumerate(per_rank)))
    return "\n".join(lines), per_rank


class ShardedEmbeddingBags(TableModule):
    """Drop-in for `BatchedEmbeddingBags` whose tables are sharded over a shard group.

    `forward(kjt) -> [B, T, D]` like the unsharded module; every member of the group must call it
    (torchrec's all-to-alls). The parameters are this rank's local shards (torchrec's
    `TableBatchedEmbeddingSlice` views of its TBE weights, one per local table), so `state_dict()`
    is the rank-local state; `sharded_state()` gives torchrec's ShardedTensors for
    torch.distributed.checkpoint. The dense kernel hands the optimizer a dense gradient per local
    shard; `ctrkit.optim.sparse.rows_and_grads` keeps its nonzero rows (O(local rows) per step,
    1/k of what an unsharded torchrec EBC costs)."""

    def __init__(self, bag: BatchedEmbeddingBags, plan, grid: ShardGrid,
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__()
        self.tables = list(bag.tables)
        self.embedding_dim = bag.embedding_dim
        self.feature_names = list(bag.feature_names)
        self._device = device
        # Not a registered submodule: its state_dict holds ShardedTensors, while ours is local.
        self.__dict__["_ebc"] = _sharder().shard(bag.to_torchrec(),
                                                 _plan_for_group(plan, grid, device),
                                                 grid.env(), device)
        self._pos = grid.pos
        self._order: Optional[tuple] = None
        self.shard_names: List[str] = []
        for pname, p in self._ebc.named_parameters():
            if p.numel() == 0:
                continue
            table = pname.split(".")[1]
            self.register_parameter(f"shard_{table}", p)
            self.shard_names.append(table)
        self._copy_from(bag, plan)
        self.num_rows = max([int(p.shape[0]) for p in self.sharded_tables] or [0])

    @property
    def sharded_tables(self) -> List[nn.Parameter]:
        """The local shards the optimizer updates (row-sparse updates of dense gradients)."""
        return [getattr(self, f"shard_{t}") for t in self.shard_names]

    @torch.no_grad()
    def _copy_from(self, bag: BatchedEmbeddingBags, plan) -> None:
        """Shards take their rows/columns of the unsharded weights (same init on every group)."""
        for i, t in enumerate(bag.tables):
            if t.name not in self.shard_names:
                continue
            mine = [sh for sh in plan[t.name].sharding_spec.shards if sh.placement.rank() == self._pos]
            if len(mine) != 1:
                raise RuntimeError(f"table {t.name}: {len(mine)} shards on one rank are not supported")
            (r0, c0), (nr, nc) = mine[0].shard_offsets, mine[0].shard_sizes
            getattr(self, f"shard_{t.name}").data.copy_(
                bag.table_weight(i)[r0:r0 + nr, c0:c0 + nc].to(self._device))

    def row_sparse_parameters(self) -> List[nn.Parameter]:
        return self.sharded_tables

    def canonical_state(self, prefix: str) -> Tuple[Dict[str, torch.Tensor], set]:
        return ({f"{prefix}{t}": st for t, st in self.sharded_state().items()},
                {f"{prefix}shard_{t}" for t in self.shard_names})

    def sharded_state(self) -> Dict[str, torch.Tensor]:
        """{table name: ShardedTensor} (global shape rows x dim), for distributed checkpoints."""
        return {k.split(".")[1]: v for k, v in self._ebc.state_dict().items()}

    def forward(self, kjt: KeyedJaggedTensor, facts=None) -> torch.Tensor:
        """[B, T, D] like the unsharded module (the batch's `facts` are not needed here)."""
        keys = list(kjt.keys())
        if keys != self.feature_names:
            kjt = kjt.permute([keys.index(f) for f in self.feature_names])
        out = self._ebc(kjt)
        kt = out.wait() if hasattr(out, "wait") else out
        values = kt.values().view(kjt.stride(), len(self.tables), self.embedding_dim)
        keys = kt.keys()   # grouped by sharding type and rank, not in table order
        if keys != self.feature_names:
            if self._order is None or self._order[0] != keys:
                self._order = (keys, torch.tensor([keys.index(f) for f in self.feature_names],
                                                  device=values.device))
            values = values.index_select(1, self._order[1])
        return values


def shard_model(model: nn.Module, grid: ShardGrid, backend: str = "gloo",
                device: torch.device = torch.device("cpu")) -> List[str]:
    """Replace every `BatchedEmbeddingBags` of the model by its sharded version; returns the plan
    descriptions and sets `model.embedding_bytes_per_rank` (bytes of tables held by each rank)."""
    described, per_rank = [], [0] * grid.k
    for path, module in list(model.named_modules()):
        if not isinstance(module, BatchedEmbeddingBags):
            continue
        plan = plan_tables(module.tables, grid.k, backend)
        text, b = describe_plan(path, plan, module.tables, grid.k)
        described.append(text)
        per_rank = [x + y for x, y in zip(per_rank, b)]
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, ShardedEmbeddingBags(module, plan, grid, device))
    model.embedding_bytes_per_rank = per_rank
    return described


def average_dense_grads(model: nn.Module, grid: ShardGrid) -> None:
    """Dense parameters are replicated inside a shard group: average their gradients over it
    (torchrec already divides the tables' gradients by k in its all-to-all's backward)."""
    if grid.k > 1:
        average_dense_gradients(split_parameters(model)[1], grid.k, grid.shard_pg)


@torch.no_grad()
def evaluate_sharded(model: nn.Module, schema, split: str, batch_size: int, grid: ShardGrid,
                     prefetch: int = 2) -> dict:
    """AUC/logloss of a shard group's model over a whole split: each member predicts its slice of
    the split (all must run the same number of forwards: torchrec's all-to-alls), and the
    predictions are gathered within the group. Every member returns the same numbers."""
    comm = comm_device()
    device = next(model.parameters()).device
    loader = BatchLoader(schema, split, batch_size, prefetch=prefetch, rank=grid.pos,
                         world_size=grid.k)
    steps = torch.tensor([len(loader)], device=comm)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=grid.shard_pg)
    filler = None
    if len(loader) == 0:   # nothing of this split here, but the group's forwards need this rank
        filler = next(iter(BatchLoader(schema, split, batch_size, prefetch=0)))
    was_training = model.training
    model.eval()
    ys, ps = [], []
    it = iter(loader)
    try:
        for _ in range(int(steps)):
            batch = next(it, None)
            p = torch.sigmoid((batch if batch is not None else filler).to(device).logits(model))
            p = p.double().to(comm)
            if batch is not None:
                ps.append(p)
                ys.append(batch.labels.double().to(comm))
                filler = batch
    finally:
        model.train(was_training)
    mine = torch.stack([torch.cat(ys) if ys else torch.zeros(0, dtype=torch.float64, device=comm),
                        torch.cat(ps) if ps else torch.zeros(0, dtype=torch.float64, device=comm)])
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(grid.k)]
    dist.all_gather(sizes, torch.tensor([mine.shape[1]], device=comm), group=grid.shard_pg)
    top = int(max(int(s) for s in sizes))
    padded = torch.zeros(2, top, dtype=torch.float64, device=comm)
    padded[:, :mine.shape[1]] = mine
    parts = [torch.zeros_like(padded) for _ in range(grid.k)]
    dist.all_gather(parts, padded, group=grid.shard_pg)
    both = torch.cat([p[:, :int(s)] for p, s in zip(parts, sizes)], dim=1).cpu().numpy()
    return auc_logloss(both[0], both[1])


def table_modules(model: nn.Module):
    """(path, module) of every embedding-table module."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, TableModule)]


def canonical_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Model state with one entry per *table* (`<module path>.<table name>`, rows x dim), the same
    keys whether the tables are sharded (ShardedTensors) or not (views into the flat weight), so
    torch.distributed.checkpoint reshards between shard group sizes and into one process."""
    out: Dict[str, torch.Tensor] = {}
    skip = set()
    for path, m in table_modules(model):
        canonical = m.canonical_state(f"{path}.")
        if canonical is not None:
            out.update(canonical[0])
            skip |= canonical[1]
    for k, v in model.state_dict().items():
        if k not in skip:
            out[k] = v
    return out


def save_model(model: nn.Module, path, group: Optional[dist.ProcessGroup] = None) -> None:
    """torch.distributed.checkpoint of the model's canonical state; a sharded model's whole shard
    group calls it with its process group, a single process with none."""
    import torch.distributed.checkpoint as dcp
    dcp.save(canonical_state(model), checkpoint_id=str(path), process_group=group,
             no_dist=not _sharded(model))


def load_model(model: nn.Module, path, group: Optional[dist.ProcessGroup] = None) -> None:
    """Load a checkpoint written by `save_model` with any shard group size, in place (DCP copies
    into the tensors of `canonical_state`, which share storage with the model's)."""
    import torch.distributed.checkpoint as dcp
    dcp.load(canonical_state(model), checkpoint_id=str(path), process_group=group,
             no_dist=not _sharded(model))


def _sharded(model: nn.Module) -> bool:
    return any(isinstance(m, ShardedEmbeddingBags) for m in model.modules())
