"""`local`: every rank trains its own replica and talks to nobody (one process: plain training).

The configured optimizers step on the rank's own gradients (or damsgrad's AMSGrad with
`distributed.base_optimizer=amsgrad`). With several ranks the replicas drift apart; evaluation
reports their network average all the same (`Strategy.validate`). Learning rates are never scaled.
"""
from __future__ import annotations

from typing import Tuple

from ctrkit.registry import STRATEGIES
from ctrkit.strategies.base import Strategy


@STRATEGIES.register("local")
class LocalStrategy(Strategy):
    name = "local"
    needs_gradients = False   # fbgemm's fused tables may update themselves inside backward

    @classmethod
    def lr_scale(cls, rule: str, workers: int, dense_adaptive: bool,
                 tables_adaptive: bool) -> Tuple[float, float]:
        return 1.0, 1.0
