"""Scaling-study helpers: learning-rate rules per worker count, samples to a target logloss."""
import math

import pytest

from ctrkit.strategies.lr_scaling import worker_lr_scale


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


def test_samples_to_interpolates_between_evaluations():
    """(The scaling study, bench/scaling.py, counts samples; tests/test_bench_scaling.py has the
    rest of its statistics.)"""
    samples_to = _scaling_study().samples_to
    c = _curve([(10, 0.50), (20, 0.46), (30, 0.44)])
    assert samples_to(c, 0.44) == 30.0 * 256
    assert math.isclose(samples_to(c, 0.45), 25.0 * 256)
    assert samples_to(c, 0.60) == 10.0 * 256
    assert samples_to(c, 0.40) is None


def _scaling_study():
    import importlib.util
    import sys
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "scaling.py"
    if "bench_scaling_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_scaling_study", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_scaling_study"]
