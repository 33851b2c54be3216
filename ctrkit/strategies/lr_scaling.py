"""Learning rates for n workers with a fixed per-worker batch: a pure function of the rule, the
strategy and n (`distributed.lr_scaling`); the config is never rewritten.

`none` is 1; `sqrt` and `linear` scale both parts by n^0.5 or n. `auto` is the strategy's own
rule (`Strategy.auto_lr_scale`), by whether each part's optimizer is Adam-type:
- SGD (dpsgd, which always steps with SGD, or allreduce with SGD): linear, the rate of the
  linear-speedup analyses;
- allreduce, Adam-type: sqrt. Averaging n gradients also shrinks Adam's denominator; the linear
  rate was ahead in the reference data's short runs and behind in the scaling study's longer ones;
- damsgrad/choco, Adam-type: min(sqrt(n), 2) on both parts. Each worker's step is normalised by
  one worker's second moment, and a larger step grows the distance between replicas on a sparse
  graph.
`local` and a single worker: 1. The runs behind `auto` are in bench/results/damsgrad_gap/ (the
reference data; summary.json lists them) and bench/results/scaling/ (synthetic data;
bench/RESULTS.md says what that older study can and cannot show); the rule is
docs/decentralized.md's.
"""
from __future__ import annotations

from typing import Tuple

from ctrkit.registry import STRATEGIES


def worker_lr_scale(rule: str, algorithm: str, workers: int, dense_adaptive: bool = True,
                    tables_adaptive: bool = True) -> Tuple[float, float]:
    """(dense, tables) learning-rate factors for `workers` workers of `algorithm`."""
    return STRATEGIES.get(algorithm).lr_scale(rule, workers, dense_adaptive, tables_adaptive)
