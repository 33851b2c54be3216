"""`allreduce`: data-parallel training, the centralized reference.

After backward the gradients are averaged over all ranks (`ctrkit.optim.allreduce`: one
all_reduce of the dense vector, all_gathers of the tables' touched rows), then every rank takes
the same step with the configured optimizers (or damsgrad's AMSGrad with
`distributed.base_optimizer=amsgrad`), so the replicas stay bit-identical. Traffic is counted as
the payload a rank contributes and the wire bytes of the ring collectives. On one worker this is
`local`.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict

from torch import nn

from ctrkit.config import Config
from ctrkit.distributed.runtime import DistEnv
from ctrkit.optim import allreduce
from ctrkit.registry import STRATEGIES
from ctrkit.strategies.base import Strategy
from ctrkit.strategies.local import LocalStrategy


@STRATEGIES.register("allreduce")
class AllreduceStrategy(Strategy):
    name = "allreduce"

    @classmethod
    def for_run(cls, cfg: Config, env: DistEnv) -> Strategy:
        return cls(cfg, env) if env.active else LocalStrategy(cfg, env)

    def after_backward(self, model: nn.Module) -> None:
        sent = allreduce.allreduce_gradients(model, self.env.world)
        self.collective.update(sent)
        self.comm_bytes += sent["wire_bytes"]

    def traffic(self, steps: int) -> Dict[str, float]:
        """`payload_bytes_per_step` (what a rank contributes to the averages) and
        `wire_bytes_per_step` (what it sends for them)."""
        return {f"{k}_per_step": self.collective[k] / max(steps, 1)
                for k in ("payload_bytes", "wire_bytes")}

    def summary(self, model: nn.Module, steps: int) -> Dict[str, object]:
        return {**super().summary(model, steps), **self.traffic(steps)}

    def load_state_dict(self, st: dict) -> None:
        super().load_state_dict(st)
        if "collective_traffic" not in st:   # a checkpoint from before wire bytes were counted:
            self.collective = Counter(payload_bytes=self.comm_bytes)   # its bytes were payload;
            self.comm_bytes = 0.0                                      # wire counts from here on
