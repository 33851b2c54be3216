"""The gossip family: `dpsgd`, `damsgrad` and `choco` (ctrkit/optim/decentralized.py).

Every worker keeps a replica and averages only with its neighbours on `distributed.topology`, no
collective in the step: the optimizer itself gossips (`DecentralizedOptimizer`), so nothing runs
after backward. Replicas must start identical, which is checked before the first step of a fresh
run. Traffic is what the exchange hands to `isend`, by kind, next to what exact gossip would have
sent. A weight average is refused: gossip moves rows that a step did not touch. With
`distributed.shard_group_size` > 1 the workers are shard groups (ctrkit/strategies/shard_groups.py).
On one worker the update rule is kept (no neighbours), so n = 1 is the honest start of a scaling
curve.
"""
from __future__ import annotations

from typing import Dict, Tuple

from torch import nn

from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import Topology, build_topology
from ctrkit.config import Config
from ctrkit.distributed.runtime import DistEnv, check_identical_replicas
from ctrkit.optim.build import LearningRates
from ctrkit.optim.decentralized import DecentralizedOptimizer, choco_options
from ctrkit.registry import STRATEGIES
from ctrkit.strategies.base import Strategy, max_table_rows
from ctrkit.strategies.shard_groups import in_shard_groups


class GossipStrategy(Strategy):
    """A `DecentralizedOptimizer` whose algorithm is the strategy's name."""

    weight_average_conflict = ("gossip moves rows a step did not touch; the averaged replicas "
                               "are already an average")
    takes_base_optimizer = False
    takes_shard_groups = True

    @classmethod
    def for_run(cls, cfg: Config, env: DistEnv) -> Strategy:
        if env.active and cfg.distributed.shard_group_size > 1:
            return in_shard_groups(cls)(cfg, env)
        return cls(cfg, env)

    @classmethod
    def auto_lr_scale(cls, workers: int, dense_adaptive: bool,
                      tables_adaptive: bool) -> Tuple[float, float]:
        """Adam-type steps: min(sqrt(n), 2), since each worker's step is normalised by one
        worker's second moment and a larger step grows the replicas' distance on a sparse graph
        (bench/results/damsgrad_gap); SGD steps: linear."""
        gossip, linear = min(float(workers) ** 0.5, 2.0), float(workers)
        return (gossip if dense_adaptive else linear), (gossip if tables_adaptive else linear)

    @property
    def amsgrad_base(self) -> bool:
        return False

    @property
    def group_size(self) -> int:
        """Ranks per decentralized worker."""
        return 1

    def gossip_graph(self, topology: Topology) -> Topology:
        """The graph over ranks that the exchange talks on."""
        return topology

    def optimizer_options(self, model: nn.Module) -> dict:
        return {}

    def build_optimizers(self, model: nn.Module, rates: LearningRates):
        dc, env = self.cfg.distributed, self.env
        rows = max_table_rows(model)
        self.topology = build_topology(dc.topology, env.world // self.group_size, dc.edges)
        gossip = self.gossip_graph(self.topology)
        self.exchange = NeighborExchange(env.rank, gossip.neighbors[env.rank], num_rows_hint=rows)
        self.optimizers = [DecentralizedOptimizer(
            model, self.name, gossip, env.rank, self.exchange, dense_lr=rates.dense,
            sparse_lr=rates.tables, betas=tuple(self.cfg.optimizer.sparse.betas), eps=dc.eps,
            rowwise=dc.rowwise_tracker, bias_correction=dc.bias_correction,
            group_size=self.group_size, gossip_tol=dc.gossip_tol,
            **self.optimizer_options(model))]
        return self.optimizers

    def on_start(self, model: nn.Module, resumed: bool) -> None:
        if not resumed:
            check_identical_replicas(model, self.env, self.grid)

    def traffic(self, steps: int) -> Dict[str, float]:
        """By kind (`dense_payload_bytes_per_step`, ...), what exact gossip would have sent
        (`exact_bytes_per_step`), their ratio, and `wire_bytes_per_step` (gossip's bytes are
        per-neighbour messages, every byte handed to isend: already wire)."""
        steps = max(steps, 1)
        opt = self.optimizers[0]
        tr = opt.traffic
        if not tr:
            return {}
        out = {f"{k}_per_step": v / steps for k, v in sorted(tr.items())}
        sent = opt.bytes_sent
        out["compression_ratio"] = tr["exact_bytes"] / sent if sent else 1.0
        out["wire_bytes_per_step"] = self.bytes_sent / steps
        return out


@STRATEGIES.register("dpsgd")
class Dpsgd(GossipStrategy):
    """Local SGD step, then gossip of the parameters."""
    name = "dpsgd"

    @classmethod
    def auto_lr_scale(cls, workers: int, dense_adaptive: bool,
                      tables_adaptive: bool) -> Tuple[float, float]:
        """Plain SGD steps, whatever optimizer the config names: linear, the rate of the
        linear-speedup analyses."""
        return float(workers), float(workers)


@STRATEGIES.register("damsgrad")
class Damsgrad(GossipStrategy):
    """Decentralized AMSGrad with a gossiped second-moment tracker."""
    name = "damsgrad"


@STRATEGIES.register("choco")
class Choco(GossipStrategy):
    """damsgrad's step with CHOCO's compressed gossip through public copies."""
    name = "choco"

    def optimizer_options(self, model: nn.Module) -> dict:
        return choco_options(self.cfg, model)

    def build_optimizers(self, model: nn.Module, rates: LearningRates):
        opts = super().build_optimizers(model, rates)
        dc = self.cfg.distributed
        if self.env.is_main:
            mb = opts[0].public_copy_bytes() / 2 ** 20
            print(f"ctrkit: choco with {dc.compressor} (dense {dc.dense_compressor or dc.compressor}), "
                  f"gamma {dc.gamma}, tracker {dc.tracker}"
                  + (f" every {dc.tracker_every} steps" if dc.tracker == "exact" else "")
                  + f"; public copies x_hat and s hold {mb:.1f} MB per worker", flush=True)
        return opts
