"""Distribution strategies: how a training step is spread over the ranks (ctrkit/strategies/base.py).

`distributed.algorithm` names one in `ctrkit.registry.STRATEGIES`: `local`, `allreduce`, and the
gossip family `dpsgd`, `damsgrad`, `choco` (each of which also runs in shard groups). A new one is
a module with a `Strategy` subclass registered by `@STRATEGIES.register("name")`.
"""
from ctrkit.config import Config
from ctrkit.distributed.runtime import DistEnv
from ctrkit.registry import STRATEGIES
from ctrkit.strategies.base import Strategy


def strategy_class(name: str) -> type:
    return STRATEGIES.get(name)


def check_strategy(cfg: Config) -> None:
    """Refuse a config its strategy cannot run (ConfigError), before any rank starts."""
    strategy_class(cfg.distributed.algorithm).check(cfg)


def build_strategy(cfg: Config, env: DistEnv) -> Strategy:
    """This rank's strategy for the config."""
    return strategy_class(cfg.distributed.algorithm).for_run(cfg, env)


__all__ = ["STRATEGIES", "Strategy", "build_strategy", "check_strategy", "strategy_class"]
