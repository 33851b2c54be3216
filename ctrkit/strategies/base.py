"""The interface of a distribution strategy: how one training step is spread over the ranks.

`distributed.algorithm` names a registered strategy (`ctrkit.registry.STRATEGIES`). For one rank
of a run, the strategy owns
- its setup: the device the model is built on and how it is placed (`model_device`, `place`),
  and the topology and neighbour exchange it talks over;
- its optimizers (`build_optimizers`), from learning rates scaled for the number of workers by a
  pure rule (`lr_scale`);
- what runs between backward and the optimizer step (`after_backward`: gradient averages);
- the model evaluated in a multi-rank run (`validate`, `network_average`, `evaluates_average`);
- its traffic figures (`bytes_sent`, `traffic`, `summary`) and its checkpointed state
  (`state_dict`, keys of the rank's `last` checkpoint);
- whether a weight average (`train.ema_decay`) may follow its steps (`weight_average_conflict`).
The trainer loop calls these and knows no algorithm's name.

    >>> from ctrkit.strategies import build_strategy            # doctest: +SKIP
    >>> strategy = build_strategy(cfg, env)                      # e.g. "allreduce" on rank r
    >>> strategy.place(model); opts = strategy.build_optimizers(model, rates)
    >>> loss.backward(); strategy.after_backward(model); [o.step() for o in opts]
"""
from __future__ import annotations

from collections import Counter
from typing import ClassVar, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import build_topology, single_worker
from ctrkit.config import Config
from ctrkit.distributed.runtime import DistEnv, comm_device, gather_floats, network_average
from ctrkit.distributed.sharding import check_grid
from ctrkit.errors import ConfigError
from ctrkit.optim.build import LearningRates, build_optimizers, fused_optimizers, split_parameters
from ctrkit.optim.decentralized import DecentralizedOptimizer
from ctrkit.registry import STRATEGIES
from ctrkit.metrics import evaluate_split


class Strategy:
    """Base class: a rank that steps with the configured optimizers and communicates nothing."""

    name: ClassVar[str] = ""
    # None: train.ema_decay may average this strategy's steps; else the reason it may not
    weight_average_conflict: ClassVar[Optional[str]] = None
    # distributed.base_optimizer=amsgrad is allowed (a replica stepping after its gradients)
    takes_base_optimizer: ClassVar[bool] = True
    # its steps read the tables' gradients (so not fbgemm's fused tables, with several workers)
    needs_gradients: ClassVar[bool] = True
    # distributed.shard_group_size > 1 is allowed (the shard groups are its workers)
    takes_shard_groups: ClassVar[bool] = False

    # ------------------------------------------------------------------ from the config
    @classmethod
    def for_run(cls, cfg: Config, env: DistEnv) -> "Strategy":
        """The strategy that runs this config on these ranks (a subclass may hand over to
        another one, as allreduce on one worker does to local)."""
        return cls(cfg, env)

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse a config this strategy cannot run (raises ConfigError); at `train` time."""
        dc = cfg.distributed
        if cfg.optimizer.sparse.fused and cls.needs_gradients and dc.workers > 1:
            raise ConfigError("optimizer.sparse.fused updates tables inside backward; algorithm "
                              f"'{dc.algorithm}' needs the gradients (use fused=false)")
        if dc.shard_group_size > 1:
            check_grid(dc.workers, dc.shard_group_size)
            if not cls.takes_shard_groups:
                gossip = [n for n in STRATEGIES.names() if STRATEGIES.get(n).takes_shard_groups]
                raise ConfigError(f"distributed.shard_group_size={dc.shard_group_size} needs a "
                                  f"decentralized algorithm ({', '.join(gossip)}), not "
                                  f"'{dc.algorithm}'")
        if dc.workers > 1 or dc.topology == "edges":
            try:   # the decentralized workers are the shard groups
                build_topology(dc.topology, dc.workers // dc.shard_group_size, dc.edges)
            except ConfigError as e:
                key = "distributed.edges" if dc.topology == "edges" or dc.edges else "distributed.topology"
                raise ConfigError(f"{key}: {e}") from None

    @classmethod
    def lr_scale(cls, rule: str, workers: int, dense_adaptive: bool,
                 tables_adaptive: bool) -> Tuple[float, float]:
        """(dense, tables) learning-rate factors for `workers` workers under `distributed.lr_scaling`
        (`auto`: `auto_lr_scale`)."""
        if workers <= 1 or rule == "none":
            return 1.0, 1.0
        if rule == "auto":
            return cls.auto_lr_scale(workers, dense_adaptive, tables_adaptive)
        f = float(workers) ** 0.5 if rule == "sqrt" else float(workers)
        return f, f

    @classmethod
    def auto_lr_scale(cls, workers: int, dense_adaptive: bool,
                      tables_adaptive: bool) -> Tuple[float, float]:
        """Averaged gradients: the square-root rule for Adam-type steps, linear for SGD."""
        sqrt, linear = float(workers) ** 0.5, float(workers)
        return (sqrt if dense_adaptive else linear), (sqrt if tables_adaptive else linear)

    # ------------------------------------------------------------------ setup
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.grid = None            # a ShardGrid when the tables are sharded (shard groups)
        self.topology = None        # the gossip graph of the workers, if any
        self.exchange: Optional[NeighborExchange] = None   # this rank's gossip exchange, if any
        self.optimizers: List[torch.optim.Optimizer] = []
        self.comm_bytes = 0.0       # wire bytes counted outside the exchange (and before a resume)
        self.collective: Counter = Counter()   # collectives: payload_bytes and wire_bytes

    @property
    def model_device(self) -> torch.device:
        """Where the model is built."""
        return self.env.device

    def place(self, model: nn.Module) -> None:
        """Place the freshly built model (before its optimizers exist)."""

    @property
    def amsgrad_base(self) -> bool:
        return self.cfg.distributed.base_optimizer == "amsgrad"

    def learning_rates(self) -> LearningRates:
        """The configured learning rates times this strategy's factors for the world size."""
        o = self.cfg.optimizer
        factors = self.lr_scale(self.cfg.distributed.lr_scaling, self.env.world,
                                dense_adaptive=self.amsgrad_base or o.dense.name != "sgd",
                                tables_adaptive=self.amsgrad_base or o.sparse.name != "sgd")
        return LearningRates.of(o).scaled(*factors)

    def build_optimizers(self, model: nn.Module, rates: LearningRates) -> List[torch.optim.Optimizer]:
        """The configured optimizers, or with distributed.base_optimizer=amsgrad damsgrad's
        AMSGrad on a one-worker view (this rank is its rank 0, the exchange has no neighbours):
        the very optimizer damsgrad has at n = 1."""
        if self.amsgrad_base:
            dc = self.cfg.distributed
            exchange = NeighborExchange(0, (), num_rows_hint=max_table_rows(model))
            self.optimizers = [DecentralizedOptimizer(
                model, "damsgrad", single_worker(), 0, exchange, dense_lr=rates.dense,
                sparse_lr=rates.tables, betas=tuple(self.cfg.optimizer.sparse.betas), eps=dc.eps,
                rowwise=dc.rowwise_tracker, bias_correction=dc.bias_correction,
                gossip_tol=dc.gossip_tol)] + fused_optimizers(model, rates.tables)
        else:
            self.optimizers = build_optimizers(model, self.cfg.optimizer, rates)
        return self.optimizers

    def on_start(self, model: nn.Module, resumed: bool) -> None:
        """Called once the run's weights are loaded, before the first step."""

    # ------------------------------------------------------------------ the step
    def after_backward(self, model: nn.Module) -> None:
        """Between backward and the optimizer step (gradient averages)."""

    # ------------------------------------------------------------------ evaluation
    @property
    def evaluates_average(self) -> bool:
        """Whether this rank evaluates the network-averaged model (with its shard group)."""
        return self.env.is_main

    def evaluate(self, model: nn.Module, split: str, loader) -> dict:
        """This rank's model on a split."""
        return evaluate_split(model, loader)

    def network_average(self, model: nn.Module) -> dict:
        """{"state": the network-averaged weights, "consensus_embedding", "consensus_dense"}."""
        return network_average(model, self.env, self.grid)

    def validate(self, model: nn.Module, loader, steps: int) -> Tuple[dict, dict, Dict[str, float]]:
        """(validation metrics of the model to keep, its weights, figures to log): this process's
        model, or in a multi-rank run the network average, which the ranks of
        `evaluates_average` evaluate; every rank gets the same numbers."""
        if not self.env.active:
            return evaluate_split(model, loader), model.state_dict(), {}
        own = self.evaluate(model, "valid", loader)
        aucs = gather_floats(own["auc"], self.env)
        net = self.network_average(model)
        vals = [0.0, 0.0]
        if self.evaluates_average:
            mine = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(net["state"])
            avg = self.evaluate(model, "valid", loader)
            model.load_state_dict(mine)
            vals = [avg["auc"], avg["logloss"]]
        t = torch.tensor(vals, dtype=torch.float64, device=comm_device())
        dist.broadcast(t, src=0)
        figures = {"auc_spread": max(aucs) - min(aucs), "auc_min": min(aucs),
                   "consensus_embedding": net["consensus_embedding"],
                   "consensus_dense": net["consensus_dense"],
                   "bytes_per_worker_step": self.bytes_sent / max(steps, 1), **self.traffic(steps)}
        return {"auc": float(t[0]), "logloss": float(t[1]), "rows": own["rows"]}, net["state"], figures

    # ------------------------------------------------------------------ traffic and state
    @property
    def bytes_sent(self) -> float:
        """Wire bytes this worker sent: gossip's messages to its neighbours, the collectives'
        share (ctrkit/comm/collective.py), and what a resumed run had sent before."""
        return self.comm_bytes + (self.exchange.bytes_sent if self.exchange else 0)

    def traffic(self, steps: int) -> Dict[str, float]:
        """Bytes per worker and step, by kind."""
        return {}

    def summary(self, model: nn.Module, steps: int) -> Dict[str, object]:
        """The final metrics' figures of a multi-rank run."""
        per_rank = [sum(p.numel() * p.element_size() for p in split_parameters(model)[0])]
        per_step = self.bytes_sent / max(steps, 1)
        return {"shard_group_size": 1, "embedding_bytes_per_rank": per_rank,
                "workers": self.env.world, "algorithm": self.name,
                "topology": self.topology.describe() if self.topology else None,
                "bytes_per_worker_step": per_step, "wire_bytes_per_step": per_step}

    def _optimizer_traffic(self) -> Optional[Counter]:
        return getattr(self.optimizers[0], "traffic", None) if self.optimizers else None

    def state_dict(self) -> dict:
        tr = self._optimizer_traffic()
        return {"bytes_sent": self.bytes_sent, "collective_traffic": dict(self.collective),
                "traffic": dict(tr) if tr is not None else {}}

    def load_state_dict(self, st: dict) -> None:
        self.comm_bytes = st.get("bytes_sent", 0)
        if "collective_traffic" in st:
            self.collective = Counter(st["collective_traffic"])
        tr = self._optimizer_traffic()
        if tr is not None:
            tr.update(st.get("traffic", {}))


def max_table_rows(model: nn.Module) -> int:
    """Rows of the model's largest table module (sizes the exchange's row ids)."""
    return max([m.num_rows for m in model.modules() if hasattr(m, "num_rows")] or [0])
