"""The scaling study, bench/scaling.py: its statistics on hand-made curves (targets, linear
interpolation, t intervals, the n=8/n=1 criterion, and that each of them can fail), the sample
budget, the validation/test split, failed runs recorded and not retried, and (slow) a tiny real
study with n = 1 and 2 that a second invocation skips."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "bench") not in sys.path:   # (scaling.py imports bench_args, as when run)
    sys.path.insert(0, str(ROOT / "bench"))


def _study():
    if "bench_scaling_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_scaling_study",
                                                      ROOT / "bench" / "scaling.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_scaling_study"]


S = _study()


def _curve(lls, interval=100):
    return [{"step": i + 1, "samples": (i + 1) * interval, "logloss": ll, "auc": 0.7}
            for i, ll in enumerate(lls)]


# ---------------------------------------------------------------------- interpolation and CIs
def test_samples_to_target_interpolates_and_can_fail():
    c = _curve([0.50, 0.46, 0.44])
    assert S.samples_to(c, 0.44) == 300.0
    assert math.isclose(S.samples_to(c, 0.45), 250.0)
    assert S.samples_to(c, 0.40) is None                  # never reached: no number
    assert S.samples_to([], 0.5) is None
    assert S.samples_to(c, 0.60) == 100.0 and S.left_censored(c, 0.60)   # at the first point
    assert not S.left_censored(c, 0.45)
    # the first crossing counts, not a later one after the curve went back up
    assert math.isclose(S.samples_to(_curve([0.5, 0.4, 0.6, 0.3]), 0.45), 150.0)


def test_t_interval_is_the_t_distribution_over_seeds():
    st = S.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)             # t(0.975, df 2) x sd 1 / sqrt(3)
    assert st["n"] == 3 and st["mean"] == 2.0 and math.isclose(st["sd"], 1.0)
    assert math.isclose(st["lo"], 2 - half) and math.isclose(st["hi"], 2 + half)
    one = S.t_interval([5.0])
    assert one["mean"] == 5.0 and one["lo"] is None and one["hi"] is None
    assert S.t_interval([])["mean"] is None


def test_ratio_interval_and_verdict():
    r = S.ratio_interval([200.0, 200.0], [100.0, 100.0])
    assert r["ratio"] == 2.0 and r["lo"] == r["hi"] == 2.0 and S.verdict(r) == "fails"
    assert S.verdict(S.ratio_interval([100.0, 100.0], [100.0, 100.0])) == "meets"
    wide = S.ratio_interval([90.0, 130.0, 110.0], [100.0, 105.0, 95.0])
    assert wide["lo"] < 1.15 < wide["hi"] and S.verdict(wide) == "inconclusive"
    assert math.isclose(wide["ratio"], 110.0 / 100.0)
    assert S.verdict(S.ratio_interval([], [100.0])) == "not reached"
    assert S.verdict(S.ratio_interval([100.0], [100.0])).startswith("point estimate only")


def test_budget_is_the_same_for_every_n_and_evaluated_at_the_same_samples():
    b = S.plan_budget(1_000_000, 1, [1, 2, 4, 8], 1024, 10)
    assert b["budget_samples"] == 121 * 8 * 1024 and b["evals"] == 11    # 99.1 % of the epoch
    for n in (1, 2, 4, 8):
        steps, every = S.steps_for(b, n, 1024)
        assert steps * n * 1024 == b["budget_samples"] and every * n * 1024 == b["eval_interval_samples"]
        assert steps * 1024 <= 1_000_000 // n - 1                      # full batches on every rank
    small = S.plan_budget(1_000_000, 1, [1, 2], 1024, 10, max_samples=20_000)
    assert small["budget_samples"] == 18_432 and small["evals"] == 9
    with pytest.raises(SystemExit):
        S.plan_budget(1_000_000, 1, [1, 2, 4, 8], 1024, 10, max_samples=5000)


def test_split_valid_writes_a_validation_and_a_test_half(tmp_path):
    src = tmp_path / "v.tsv"
    src.write_text("".join(f"{i}\ta\n" for i in range(7)) + "\n")     # (a blank line at the end)
    rec = S.split_valid(src, tmp_path / "out", header=False)
    assert (tmp_path / "out" / "valid.tsv").read_text() == "".join(f"{i}\ta\n" for i in range(3))
    assert (tmp_path / "out" / "test.tsv").read_text() == "".join(f"{i}\ta\n" for i in range(3, 7))
    assert rec["valid"]["rows"] == 3 and rec["test"]["rows"] == 4 and rec["source_rows"] == 7
    src.write_text("label,x\n1,a\n0,b\n")
    S.split_valid(src, tmp_path / "h", header=True)
    assert (tmp_path / "h" / "valid.tsv").read_text() == "label,x\n1,a\n"
    assert (tmp_path / "h" / "test.tsv").read_text() == "label,x\n0,b\n"


# ---------------------------------------------------------------------- the summary
def _run(algo, n, lr, seed, lls, status="ok"):
    curve = _curve(lls)
    r = {"name": S.run_name(algo, n, lr, seed), "algorithm": algo, "workers": n, "lr": lr,
         "seed": seed, "status": status, "kind": "tune" if seed == 0 else "seed",
         "steps": 400 // n, "wall_s": 1.0}
    if status != "ok":
        return {**r, "error": "ConfigError: boom"}
    return {**r, "curve": curve, "final_valid_logloss": lls[-1], "final_valid_auc": 0.7,
            "test": {"auc": 0.71, "logloss": 0.5}, "best_step": 400 // n,
            "worst_worker": {"auc_min": 0.69, "auc_spread": 0.01, "consensus_dense": 0.1}
            if n > 1 else None,
            "bytes_per_step": 1000.0 * (n > 1) or None,
            "bytes_key": "bytes_per_worker_step" if n > 1 else None}


def _handmade_runs():
    d, a = "damsgrad", "allreduce_adam"
    one = [[0.50, 0.45, 0.44, 0.43], [0.50, 0.45, 0.44, 0.44], [0.50, 0.45, 0.44, 0.42]]
    slow = [[0.60, 0.50, 0.46, 0.44], [0.60, 0.50, 0.46, 0.439], [0.60, 0.50, 0.47, 0.44]]
    # damsgrad's n = 1 cell is allreduce_amsgrad's n = 1 runs (S.SAME_AT_N1)
    m = "allreduce_amsgrad"
    runs = [_run(m, 1, 5e-4, 0, [0.5, 0.48, 0.47, 0.46]), _run(m, 1, 2e-3, 0, [0.5, 0.47, 0.46, 0.45])]
    runs += [_run(m, 1, 1e-3, s, c) for s, c in enumerate(one)]
    runs += [_run(d, 2, 1e-3, s, c) for s, c in enumerate(one)]          # as fast as n = 1
    runs += [_run(d, 8, 1e-3, 0, [0.6, 0.55, 0.5, 0.47]), _run(d, 8, 4e-3, 0, [], "failed")]
    runs += [_run(d, 8, 2e-3, s, c) for s, c in enumerate(slow)]         # 1.33x the samples
    runs += [_run(a, 1, 1e-3, s, [0.50, 0.46, 0.45, 0.45]) for s in range(3)]   # never at 0.44
    runs += [_run(a, 8, 1e-3, s, c) for s, c in enumerate(one[:2] + [[0.5, 0.46, 0.45, 0.45]])]
    return runs


def test_summary_targets_lr_choice_and_the_criterion(tmp_path):
    sm = S.summarize(_handmade_runs(), {"tune_seed": 0, "seeds": [0, 1, 2]})
    assert sm["best_algorithm_at_n1"] == "damsgrad"
    t = {x["name"]: x["logloss"] for x in sm["targets"]}
    assert t["hard"] == 0.44                          # the worst n = 1 seed of the best algorithm
    assert math.isclose(t["easy"], 0.50 - 0.02) and math.isclose(t["medium"], 0.50 - 0.04)
    r = sm["results"]["damsgrad"]
    assert r["1"]["lr"] == 1e-3 and r["1"]["lr_at_grid_edge"] is False
    assert sm["results"]["choco"]["1"] == r["1"] == sm["results"]["allreduce_amsgrad"]["1"]
    assert "choco" not in {c["algorithm"] for c in sm["criterion"]["checks"]}   # no n = 8 run
    assert r["8"]["lr"] == 2e-3 and r["8"]["lr_tuning"]["0.004"].startswith("failed")
    assert r["1"]["samples_to_target"]["hard"]["per_seed"] == [300.0, 300.0, 300.0]
    fast, slow = r["2"]["ratio_to_n1"]["hard"], r["8"]["ratio_to_n1"]["hard"]
    assert fast["ratio"] == 1.0 and fast["verdict"] == "meets" and fast["steps_speedup"] == 2.0
    assert slow["ratio"] > 1.3 and slow["lo"] > 1.15 and slow["verdict"] == "fails"
    assert math.isclose(r["8"]["worst_worker"]["worker_auc_min"]["mean"], 0.69)
    assert r["8"]["bytes_key"] == "bytes_per_worker_step" and r["1"]["bytes_key"] is None
    assert math.isclose(r["8"]["test_auc"]["mean"], 0.71) and r["8"]["test_is_last_model"] == "3/3"
    ar = sm["results"]["allreduce_adam"]
    assert ar["1"]["samples_to_target"]["hard"]["reached"] == "0/3"
    st8 = ar["8"]["samples_to_target"]["hard"]
    assert st8["reached"] == "2/3" and st8["mean"] is None and st8["per_seed"][2] is None
    assert ar["8"]["ratio_to_n1"]["hard"]["verdict"] == "not reached"
    checks = {(c["algorithm"], c["target"]): c["verdict"] for c in sm["criterion"]["checks"]}
    assert sm["criterion"]["workers"] == 8
    assert checks[("damsgrad", "hard")] == "fails" and checks[("allreduce_adam", "hard")] == "not reached"
    mc = r["8"]["curve"]
    assert [p["samples"] for p in mc] == [100, 200, 300, 400]
    assert mc[-1]["logloss_min"] == 0.439 and mc[-1]["logloss_max"] == 0.44
    S.plot(sm, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(S._clean(sm), allow_nan=False)


def test_public_train_stays_callable_after_the_trainer_is_imported():
    """bench/scaling.py calls ctrkit.train(cfg) once per run, in one process."""
    import ctrkit
    import ctrkit.train.trainer  # noqa: F401
    assert callable(ctrkit.train) and ctrkit.train.__module__ == "ctrkit"


# ---------------------------------------------------------------------- the program
def _data(tmp_path, rows=2000):
    from ctrkit.data.synth import write_synthetic
    write_synthetic(tmp_path / "raw", rows, valid_rows=400, test_rows=0, seed=1, card_scale=0.01,
                    progress=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""data:
  format: criteo_tsv
  train: {tmp_path / 'raw' / 'train.tsv'}
  valid: {tmp_path / 'raw' / 'valid.tsv'}
model: {{name: deepfm, embedding_dim: 4, hidden_units: [16]}}
optimizer:
  dense: {{name: adam, lr: 1.0e-3}}
  sparse: {{name: adam, lr: 1.0e-3}}
distributed: {{timeout_s: 60}}
train: {{batch_size: 16, device: cpu, prefetch: 0}}
""")
    return cfg


def test_a_failed_run_is_recorded_and_not_retried(tmp_path, monkeypatch, capsys):
    cfg = _data(tmp_path, rows=400)
    monkeypatch.setitem(S.ALGORITHMS, "broken",
                        ["distributed.algorithm=damsgrad", "distributed.no_such_key=1"])
    out = tmp_path / "study"
    args = [str(cfg), "--out", str(out), "--algorithms", "broken", "--workers", "1", "--lrs",
            "1e-3", "--seeds", "0", "--max-samples", "64", "--evals", "2"]
    assert S.main(args) == 0
    path = out / "runs" / "broken_n1_lr0.001_s0.json"
    rec = json.loads(path.read_text())
    assert rec["status"] == "failed" and "no_such_key" in rec["error"]
    assert "FAILED" in capsys.readouterr().out
    assert (out / "summary.json").is_file() and (out / "scaling.png").is_file()
    assert json.loads((out / "study.json").read_text())["splits"]["test"]["rows"] == 200
    mtime = path.stat().st_mtime_ns
    assert S.main(args) == 0
    assert "skipped, failed earlier" in capsys.readouterr().out and path.stat().st_mtime_ns == mtime
    assert S.main(args + ["--retry-failed"]) == 0
    assert "FAILED" in capsys.readouterr().out and path.stat().st_mtime_ns != mtime
    assert S.main(args + ["--batch", "8"]) == 2                    # other settings: refused
    assert "other settings" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert S.main([str(cfg), "--out", str(tmp_path / "mine")]) == 2
    assert "not a scaling study folder" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_study_with_one_and_two_workers_then_skipped(tmp_path):
    cfg = _data(tmp_path)
    out = tmp_path / "study"
    cmd = [sys.executable, "bench/scaling.py", str(cfg), "--out", str(out), "--algorithms",
           "damsgrad", "--workers", "1,2", "--lrs", "1e-3,3e-3", "--seeds", "0", "--batch", "16",
           "--max-samples", "512", "--evals", "4"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(p.name for p in (out / "runs").glob("*.json"))
    # at n = 1 damsgrad is allreduce_amsgrad (S.SAME_AT_N1): that run set is trained, once
    assert names == [f"{a}_n{n}_lr{lr}_s0.json" for a, n in (("allreduce_amsgrad", 1), ("damsgrad", 2))
                     for lr in ("0.001", "0.003")]
    recs = {p.name: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert all(x["status"] == "ok" for x in recs.values()), [x.get("error") for x in recs.values()]
    one, two = recs["allreduce_amsgrad_n1_lr0.001_s0.json"], recs["damsgrad_n2_lr0.001_s0.json"]
    assert one["steps"] == 32 and two["steps"] == 16
    assert [c["samples"] for c in one["curve"]] == [c["samples"] for c in two["curve"]] == \
        [128, 256, 384, 512]
    assert two["metrics"]["samples"] == 512 and two["worst_worker"]["auc_min"] <= 1
    assert two["bytes_key"] in ("wire_bytes_per_step", "bytes_per_worker_step")
    assert two["bytes_per_step"] > 0 and one["bytes_key"] is None
    assert not list((out / "work").iterdir())                  # run folders removed
    sm = json.loads((out / "summary.json").read_text())
    assert set(sm["results"]["damsgrad"]) == {"1", "2"} and sm["criterion"]["workers"] == 2
    assert sm["results"]["damsgrad"]["2"]["test_auc"]["mean"] > 0.5
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert r.stdout.count("final valid logloss") == 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped, done earlier") == 4
    assert "0 run(s) trained, 4 skipped, 0 failed" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    only = subprocess.run(cmd[:5] + ["--summarize-only"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert only.returncode == 0 and "wrote" in only.stdout, only.stderr[-2000:]


def test_only_trains_the_named_n_with_the_budget_of_all(tmp_path, monkeypatch, capsys):
    """--only 2 trains the n = 2 runs alone; the budget is still planned for all of --workers
    (lcm 4 here), so runs made in separate invocations compare."""
    cfg = _data(tmp_path, rows=400)
    monkeypatch.setitem(S.ALGORITHMS, "broken",
                        ["distributed.algorithm=damsgrad", "distributed.no_such_key=1"])
    out = tmp_path / "study"
    args = [str(cfg), "--out", str(out), "--algorithms", "broken", "--workers", "1,2,4", "--lrs",
            "1e-3", "--seeds", "0", "--max-samples", "128", "--evals", "2"]
    assert S.main(args + ["--only", "3"]) == 2
    assert "not a subset" in capsys.readouterr().err
    assert S.main(args + ["--only", "2"]) == 0
    assert sorted(p.name for p in (out / "runs").glob("*.json")) == ["broken_n2_lr0.001_s0.json"]
    assert json.loads((out / "study.json").read_text())["budget"]["lcm_workers"] == 4
