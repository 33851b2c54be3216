"""Scaling-study helpers: learning-rate rules per worker count, iterations to a target logloss."""
import math

import pytest

from ctrkit.bench import _iters_to, summarize_scaling
from ctrkit.optim.build import worker_lr_scale


@pytest.mark.parametrize("rule,algo,n,adaptive,want", [
    ("none", "damsgrad", 8, True, (1.0, 1.0)),
    ("auto", "local", 8, True, (1.0, 1.0)),
    ("auto", "allreduce", 4, True, (2.0, 2.0)),      # Adam: square-root rule
    ("auto", "allreduce", 4, False, (4.0, 4.0)),     # SGD: linear rule
    ("auto", "damsgrad", 2, True, (2 ** 0.5, 2 ** 0.5)),   # decentralized Adam: sqrt(n) ...
    ("auto", "damsgrad", 8, True, (2.0, 2.0)),       # ... capped at 2
    ("auto", "choco", 9, False, (9.0, 9.0)),         # SGD steps: linear
    ("auto", "dpsgd", 2, False, (2.0, 2.0)),
    ("auto", "dpsgd", 4, True, (4.0, 4.0)),          # dpsgd steps are SGD even with adam named
    ("sqrt", "damsgrad", 9, True, (3.0, 3.0)),
    ("linear", "allreduce", 1, True, (1.0, 1.0)),
])
def test_worker_lr_scale(rule, algo, n, adaptive, want):
    got = worker_lr_scale(rule, algo, n, dense_adaptive=adaptive, tables_adaptive=adaptive)
    assert all(math.isclose(g, w) for g, w in zip(got, want))


def _curve(points):
    return [{"step": s, "samples": s * 256, "auc": 0.7, "logloss": l} for s, l in points]


def test_iters_to_interpolates_between_evaluations():
    c = _curve([(10, 0.50), (20, 0.46), (30, 0.44)])
    assert _iters_to(c, 0.44) == 30.0
    assert math.isclose(_iters_to(c, 0.45), 25.0)
    assert _iters_to(c, 0.60) == 10.0
    assert _iters_to(c, 0.40) is None


def test_speedup_is_relative_to_the_same_algorithm_at_one_worker():
    runs = [
        {"algorithm": "allreduce", "topology": "ring", "workers": 1, "curve": _curve([(50, 0.5), (100, 0.44)])},
        {"algorithm": "allreduce", "topology": "ring", "workers": 4, "curve": _curve([(25, 0.44), (50, 0.43)])},
        {"algorithm": "damsgrad", "topology": "ring", "workers": 1, "curve": _curve([(50, 0.5), (100, 0.45)])},
        {"algorithm": "damsgrad", "topology": "ring", "workers": 4, "curve": _curve([(10, 0.5), (20, 0.45)])},
    ]
    out = summarize_scaling({"runs": runs})
    assert out["target_logloss"] == 0.45                  # the worse n = 1 final logloss
    r = {(x["algorithm"], x["workers"]): x for x in out["runs"]}
    assert r[("damsgrad", 4)]["speedup"] == 5.0           # 100 / 20
    assert math.isclose(r[("allreduce", 1)]["iters_to_target"], 50 + 50 * (0.05 / 0.06))
    assert r[("allreduce", 4)]["iters_to_target"] == 25.0
