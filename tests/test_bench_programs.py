"""The benchmark programs bench/throughput.py, bench/gossip_compression.py and bench/sharding.py
(which replaced `ctrkit bench`): their options keep the old environment variables' defaults, the
throughput variants run the trainer's own step alternated round by round, the result files keep
their format, and (slow) real sweeps with two workers."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:   # (the programs import their sibling modules, as when run)
    sys.path.insert(0, str(BENCH))


def _program(name: str):
    key = f"bench_program_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


TP, GC, SH = _program("throughput"), _program("gossip_compression"), _program("sharding")
import fixed_runs  # noqa: E402  (bench/, on sys.path above)

# The result formats of bench/results/ (bench/RESULTS.md reads them).
RUN_ROW = {"algorithm", "workers", "steps", "samples", "final_auc", "final_logloss", "auc_spread",
           "lr_scale", "consensus_embedding", "consensus_dense", "bytes_per_worker_step",
           "total_bytes_per_worker", "traffic", "shard_group_size", "embedding_bytes_per_rank",
           "wall_s"}
COMPRESSION = {"date", "rows", "batch_per_worker", "samples", "topology", "lr_scaling",
               "dpsgd_lr", "runs"}
SHARDING = {"date", "rows", "batch_per_rank", "workers", "samples", "algorithm", "topology",
            "lr_scaling", "runs"}
THROUGHPUT = {"date", "host", "cpus", "torch", "batch_size", "device", "model",
              "sparse_optimizer", "tables", "vocabulary_rows", "train_rows", "steps",
              "peak_rss_mb", "prepare"}
STEPS = {"device", "threads", "step_ms", "samples_per_s", "full_over_dense",
         "big_over_small_tables", "full_over_dense_frozen_input", "full_ema_over_full", "rounds",
         "steps_per_round"}


def _data(tmp_path, rows=600, batch=16):
    from ctrkit.data.synth import write_synthetic
    write_synthetic(tmp_path / "raw", rows, valid_rows=200, test_rows=0, seed=1, card_scale=0.01,
                    progress=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""data:
  format: criteo_tsv
  train: {tmp_path / 'raw' / 'train.tsv'}
  valid: {tmp_path / 'raw' / 'valid.tsv'}
  prepared_dir: {tmp_path / 'prepared'}
model: {{name: deepfm, embedding_dim: 4, hidden_units: [16]}}
optimizer:
  dense: {{name: adam, lr: 1.0e-3}}
  sparse: {{name: adam, lr: 1.0e-3}}
distributed: {{timeout_s: 120, topology: ring, gamma: 0.4}}
train: {{batch_size: {batch}, eval_batch_size: 256, device: cpu, prefetch: 0, threads: 1,
        progress: false, tensorboard: false, plot: false, run_dir: {tmp_path / 'runs'}}}
""")
    return cfg


# ---------------------------------------------------------------------- ctrkit bench is gone
def test_ctrkit_bench_points_to_the_programs(capsys):
    from ctrkit.cli import main
    assert importlib.util.find_spec("ctrkit.bench") is None
    assert main(["bench", "throughput", "configs/bench_throughput.yaml", "--out", "x.json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "bench/throughput.py" in err and "gossip_compression.py" in err
    assert main(["train.seed=1", "bench"]) == 2 and "bench/README.md" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "{synth,prepare,train,eval,demo,predict,export}" in capsys.readouterr().out


def test_no_environment_variables_configure_the_benchmarks():
    for path in [*BENCH.glob("*.py"), *(ROOT / "ctrkit").rglob("*.py")]:
        assert "CTRKIT_BENCH" not in path.read_text(), path
    for name in ("throughput", "gossip_compression", "sharding", "fixed_runs", "bench_args"):
        assert "environ" not in (BENCH / f"{name}.py").read_text(), name


# ---------------------------------------------------------------------- options
def test_options_have_the_old_defaults(tmp_path):
    t = TP.build_parser().parse_args(["c.yaml"])
    assert (t.rounds, t.steps, t.out) == (7, 3, Path("bench/out/throughput.json"))
    assert (t.small_rows, t.big_rows, t.prepare_rounds, t.threads) == (10_000, 10_000_000, 7, None)
    c = GC.build_parser().parse_args(["c.yaml"])
    assert c.workers == [4, 8] and c.samples == 0 and c.out == Path("bench/results/compression")
    assert c.compressors == ["topk:0.01+int8@0.3", "topk:0.01+int8@0.6", "topk:0.03+int8@0.5"]
    assert c.algorithms == ["allreduce", "damsgrad", "dpsgd", "local"]
    s = SH.build_parser().parse_args(["c.yaml"])
    assert (s.shards, s.workers, s.samples, s.out) == ([1, 2, 4], 4, 0,
                                                       Path("bench/results/sharding"))
    # an empty list means none; samples may be written 1e6; --set collects overrides
    c = GC.build_parser().parse_args(["c.yaml", "--compressors", "", "--algorithms", "",
                                      "--samples", "1e6", "--set", "train.seed=3"])
    assert (c.compressors, c.algorithms, c.samples, c.overrides) == ([], [], 10 ** 6,
                                                                     ["train.seed=3"])


@pytest.mark.parametrize("prog,args,why", [
    ("throughput", ["--rounds", "0"], "--rounds: must be an integer >= 1"),
    ("throughput", ["--steps", "two"], "--steps: not a number"),
    ("gossip_compression", ["--workers", "4,x"], "--workers: not a comma-separated list of int"),
    ("gossip_compression", ["--set", "nokey"], "--set takes key=value"),
    ("sharding", ["--workers", "1"], "--workers: must be an integer >= 2"),
    ("sharding", ["--shards", ""], "--shards: empty list"),
])
def test_bad_options_are_one_line(capsys, prog, args, why):
    assert _program(prog).main(["c.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1


def test_a_bad_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {no_such_key: 1}\n")
    for prog in (TP, GC, SH):
        assert prog.main([str(bad)]) == 2
        err = capsys.readouterr().err
        assert "no_such_key" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------- throughput
def test_variants_alternate_round_by_round_and_ratios_are_medians_of_rounds():
    calls = []
    a, b = TP.Variant("a", lambda: calls.append("a")), TP.Variant("b", lambda: calls.append("b"))
    TP.alternate([a, b], rounds=3, steps_per_round=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3   # 2 warm-up steps each
    assert len(a.times) == len(b.times) == 3
    a.times, b.times = [2.0, 4.0, 9.0], [1.0, 1.0, 3.0]
    assert TP.median_ratio(a, b) == 3.0   # per-round ratios 2, 4, 3 (medians' ratio: 4)


def test_throughput_times_the_trainers_own_step(tmp_path, monkeypatch):
    from ctrkit.train.trainer import Trainer
    seen = []
    real_step = Trainer.train_step

    def counted(self, batch):
        vocab = [f.vocab_size for f in self.schema.sparse]
        seen.append((id(self), sum(vocab), min(vocab), int(batch.sparse.values().max()),
                     self.ema is not None))
        return real_step(self, batch)
    monkeypatch.setattr(Trainer, "train_step", counted)
    cfg = _data(tmp_path)
    out = tmp_path / "out" / "throughput.json"
    rc = TP.main([str(cfg), "--out", str(out), "--rounds", "2", "--steps", "1", "--threads", "1",
                  "--small-rows", "52", "--big-rows", "520", "--prepare-rounds", "1", "--quiet"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert set(r) == THROUGHPUT and len(r["steps"]) == 1 and set(r["steps"][0]) == STEPS
    st = r["steps"][0]
    names = ["dense_only", "full", "full_52_rows", "full_520_rows", "dense_only_frozen_input",
             "full_ema"]
    assert list(st["step_ms"]) == list(st["samples_per_s"]) == names
    assert all(st[k] > 0 for k in ("full_over_dense", "big_over_small_tables",
                                   "full_over_dense_frozen_input", "full_ema_over_full"))
    assert (st["threads"], st["rounds"], st["steps_per_round"], r["batch_size"]) == (1, 2, 1, 16)
    assert r["train_rows"] == r["prepare"]["rows"] == 600 and r["prepare"]["prepare_over_read"] > 0
    # four trainers (full, 52 rows, 520 rows, full with the average), each 2 warm-up + 2 x 1 steps
    trainers = {}
    for tid, *facts in seen:
        trainers.setdefault(tid, []).append(facts)
    assert len(trainers) == 4 and all(len(v) == 4 for v in trainers.values())
    totals = sorted(v[0][0] for v in trainers.values())
    assert totals == sorted([52, 520] + [r["vocabulary_rows"]] * 2)   # 2 and 20 rows per table
    folded = [f for v in trainers.values() for f in v if f[0] in (52, 520)]
    assert len(folded) == 8 and all(max_id < per_table for _, per_table, max_id, _ in folded)
    assert sum(v[0][3] for v in trainers.values()) == 1   # one variant with the weight average
    # what each round's prepare wrote is removed again (ctrkit's manifest and lock stay)
    left = [p.name for d in out.parent.glob("prepare_bench_*") for p in d.rglob("*")]
    assert left and set(left) <= {".ctrkit-manifest.json", ".ctrkit-lock"}


# ---------------------------------------------------------------------- compression, sharding
class _FakeTrain:
    """Stands in for ctrkit.train: records the configs, returns metrics a run would report."""

    def __init__(self, out=None, name="compression.json"):
        self.configs, self.out, self.name, self.partial = [], out, name, []

    def __call__(self, c, progress=None):
        if self.out is not None and (self.out / self.name).is_file():
            self.partial.append(json.loads((self.out / self.name).read_text()))
        self.configs.append(c)
        d = c.distributed
        sent = {"local": 0.0, "allreduce": 500.0, "damsgrad": 1000.0, "dpsgd": 800.0,
                "choco": 100.0 * d.gamma}[d.algorithm]
        k = d.shard_group_size
        m = {"valid": {"auc": 0.70 + 0.01 * k + (0.001 if d.algorithm == "choco" else 0),
                       "logloss": 0.5, "rows": 200},
             "lr_scale": {"dense": 1.0, "tables": 1.0}, "bytes_per_worker_step": sent,
             "wire_bytes_per_step": sent, "auc_spread": 0.001,
             "shard_group_size": k, "embedding_bytes_per_rank": [4000 // k] * d.workers}
        return type("Result", (), {"metrics": m})()


def test_compression_sweep_runs_and_json(tmp_path, monkeypatch):
    cfg = _data(tmp_path, rows=600, batch=10)
    out = tmp_path / "res"
    fake = _FakeTrain(out)
    monkeypatch.setattr(fixed_runs.ctrkit, "train", fake)
    rc = GC.main([str(cfg), "--out", str(out), "--workers", "2,3", "--algorithms",
                  "damsgrad,dpsgd,local", "--compressors", "topk:0.1+int8@0.5,sign",
                  "--samples", "120"])
    assert rc == 0
    r = json.loads((out / "compression.json").read_text())
    assert set(r) == COMPRESSION
    assert (r["rows"], r["samples"], r["batch_per_worker"]) == (600, 120, 10)
    assert (r["topology"], r["dpsgd_lr"]) == ("ring", 0.05)
    runs = r["runs"]
    assert [(x["algorithm"], x["workers"]) for x in runs] == \
        [(a, n) for n in (2, 3) for a in ("damsgrad", "dpsgd", "local", "choco", "choco")]
    assert all(RUN_ROW <= set(x) for x in runs)
    assert [x["steps"] for x in runs] == [6] * 5 + [4] * 5      # samples // (n x batch)
    chocos = [x for x in runs if x["algorithm"] == "choco"]
    assert [(x["compressor"], x["gamma"]) for x in chocos] == [("topk:0.1+int8", 0.5),
                                                               ("sign", 0.4)] * 2   # config gamma
    for x in runs:
        assert x["bytes_vs_damsgrad"] == x["total_bytes_per_worker"] / (1000.0 * x["steps"])
        assert x["auc_vs_damsgrad"] == pytest.approx(x["final_auc"] - 0.71)
    # run configs: fixed steps, evaluated and saved once, dpsgd at its own unscaled lr
    by_dir = {Path(c.train.run_dir).name: c for c in fake.configs}
    assert sorted(by_dir) == sorted(f"{t}-n{n}" for n in (2, 3) for t in (
        "damsgrad", "dpsgd", "local", "choco-topk0.1+int8-g0.5", "choco-sign-g0.4"))
    for c in fake.configs:
        t = c.train
        assert t.max_steps == t.eval_every == t.checkpoint_every and not t.early_stop.enabled
        assert not (t.progress or t.plot or t.tensorboard or t.resume) and t.overwrite
    d = by_dir["dpsgd-n2"]
    assert (d.optimizer.dense.lr, d.optimizer.sparse.lr, d.distributed.lr_scaling) == \
        (0.05, 0.05, "none")
    assert by_dir["damsgrad-n2"].optimizer.dense.lr == 1e-3
    # the file is rewritten after every run (a killed sweep keeps what it measured)
    assert [len(p["runs"]) for p in fake.partial] == list(range(1, 10))
    assert all(p["partial"] for p in fake.partial)
    assert (out / "compression.png").read_bytes()[:4] == b"\x89PNG"


def test_compression_checks_every_run_before_training_any(tmp_path, monkeypatch, capsys):
    cfg = _data(tmp_path)
    fake = _FakeTrain()
    monkeypatch.setattr(fixed_runs.ctrkit, "train", fake)
    rc = GC.main([str(cfg), "--out", str(tmp_path / "res"), "--workers", "2",
                  "--algorithms", "damsgrad,nosuch", "--compressors", ""])
    assert rc == 2 and fake.configs == []
    err = capsys.readouterr().err
    assert "distributed.algorithm" in err and len(err.strip().splitlines()) == 1


def test_sharding_sweep_json(tmp_path, monkeypatch, capsys):
    cfg = _data(tmp_path, rows=600, batch=10)
    out = tmp_path / "res"
    fake = _FakeTrain(out, "sharding.json")
    monkeypatch.setattr(fixed_runs.ctrkit, "train", fake)
    rc = SH.main([str(cfg), "--out", str(out), "--workers", "4", "--shards", "2,1,4",
                  "--set", "distributed.algorithm=damsgrad", "--samples", "200"])
    assert rc == 0
    r = json.loads((out / "sharding.json").read_text())
    assert set(r) == SHARDING
    assert (r["workers"], r["samples"], r["algorithm"]) == (4, 200, "damsgrad")
    runs = r["runs"]
    assert [x["shard_group_size"] for x in runs] == [2, 1, 4]
    assert all(RUN_ROW <= set(x) for x in runs)
    assert [x["max_embedding_bytes_per_rank"] for x in runs] == [2000, 4000, 1000]
    assert [x["memory_vs_replicated"] for x in runs] == [0.5, 1.0, 0.25]
    assert [round(x["auc_vs_replicated"], 6) for x in runs] == [0.01, 0.0, 0.03]
    assert sorted(Path(c.train.run_dir).name for c in fake.configs) == \
        ["damsgrad-n4-k1", "damsgrad-n4-k2", "damsgrad-n4-k4"]
    assert all(c.train.max_steps == 5 and c.distributed.workers == 4 for c in fake.configs)
    assert [len(p["runs"]) for p in fake.partial] == [1, 2]
    fake.configs.clear()   # default samples: half an epoch (600 rows / 2 = 300: 7 steps of 4 x 10)
    assert SH.main([str(cfg), "--out", str(out), "--shards", "2", "--set",
                    "distributed.algorithm=damsgrad"]) == 0
    assert [c.train.max_steps for c in fake.configs] == [7]
    assert json.loads((out / "sharding.json").read_text())["samples"] == 280
    capsys.readouterr()
    fake.configs.clear()
    assert SH.main([str(cfg), "--out", str(out), "--shards", "1,3"]) == 2   # 3 does not divide 4
    assert "must divide" in capsys.readouterr().err and fake.configs == []


def test_a_real_run_keeps_its_metrics_and_loses_its_checkpoints(tmp_path):
    """One worker, in this process: the row comes from ctrkit.train's own metrics."""
    import ctrkit
    cfg = ctrkit.load_config(_data(tmp_path))
    c = fixed_runs.run_config(cfg, tmp_path / "runs" / "one", "local", 1, 12)
    row = fixed_runs.run_one(c)
    assert set(row) == RUN_ROW and row["steps"] == 12 and row["samples"] == 192
    assert 0 < row["final_auc"] < 1 and row["bytes_per_worker_step"] == 0.0
    run = tmp_path / "runs" / "one"
    assert json.loads((run / "metrics.json").read_text())["steps"] == 12
    assert not [p for p in (run / "checkpoints").rglob("*") if p.is_file()]


# ---------------------------------------------------------------------- real sweeps (processes)
@pytest.mark.slow
def test_compression_with_two_workers(tmp_path):
    cfg = _data(tmp_path, rows=1200)
    out = tmp_path / "res"
    cmd = [sys.executable, "bench/gossip_compression.py", str(cfg), "--out", str(out),
           "--workers", "2", "--algorithms", "damsgrad", "--compressors", "topk:0.1+int8@0.5",
           "--samples", "640"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "compression.json").read_text())
    assert set(res) == COMPRESSION and "partial" not in res
    exact, choco = res["runs"]
    assert (exact["algorithm"], choco["algorithm"], exact["steps"]) == ("damsgrad", "choco", 20)
    assert exact["bytes_vs_damsgrad"] == 1.0 and 0 < choco["bytes_vs_damsgrad"] < 1
    assert choco["traffic"]["compression_ratio"] > 1 and 0.4 < choco["final_auc"] < 1
    assert "compression: n=2 choco-topk:0.1+int8-g0.5" in r.stdout
    for run in ("damsgrad-n2", "choco-topk0.1+int8-g0.5-n2"):
        assert not [p for p in (tmp_path / "runs" / run / "checkpoints").rglob("*")
                    if p.is_file()]


@pytest.mark.slow
def test_sharding_with_two_ranks(tmp_path):
    cfg = _data(tmp_path, rows=1200)
    out = tmp_path / "res"
    cmd = [sys.executable, "bench/sharding.py", str(cfg), "--out", str(out), "--workers", "2",
           "--shards", "1,2", "--samples", "640", "--set", "distributed.algorithm=damsgrad"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "sharding.json").read_text())
    assert set(res) == SHARDING
    rep, shard = res["runs"]
    assert (rep["shard_group_size"], shard["shard_group_size"]) == (1, 2)
    assert len(shard["embedding_bytes_per_rank"]) == 2 and shard["memory_vs_replicated"] < 0.75
    assert rep["auc_vs_replicated"] == 0.0 and 0.4 < shard["final_auc"] < 1


def test_the_serving_bench_measures_predict_its_stages_and_latency(tmp_path):
    """bench/predict.py on a tiny model: one result file per measurement and thread count, the
    stages' rates and ratios among them, and a finished file is skipped when run again."""
    PR = _program("predict")
    cfg = _data(tmp_path)
    out, work = tmp_path / "results", tmp_path / "work"
    args = [str(cfg), "--out", str(out), "--work", str(work), "--threads", "1", "--rounds", "1",
            "--train-steps", "3"]
    assert PR.main(args) == 0
    res = json.loads((out / "predict_t1.json").read_text())
    assert set(res["rows_per_s"]) == {"predict", "predict_bf16", "read", "train", "bf16_reader",
                                      "bf16_encode", "bf16_forward"}
    assert all(len(v) == 1 and v[0] > 0 for v in res["rows_per_s"].values())
    assert set(res["bf16_stages_over_read"]) == {"reader", "encode", "forward"}
    assert res["bf16_agreement"]["max_abs_diff"] < 0.05
    lat = json.loads((out / "latency_t1.json").read_text())["latency"]
    assert set(lat) == {"1", "32", "512"} and all(v["p50_ms"] > 0 for v in lat.values())
    before = (out / "predict_t1.json").stat().st_mtime_ns
    program = (work / "export" / "model.pt2").stat().st_mtime_ns
    assert PR.main(args) == 0 and (out / "predict_t1.json").stat().st_mtime_ns == before
    assert (work / "export" / "model.pt2").stat().st_mtime_ns == program   # (nothing measured)
    (out / "latency_t1.json").unlink()   # measured again: with a program exported by this code
    assert PR.main(args) == 0 and (work / "export" / "model.pt2").stat().st_mtime_ns > program
    assert "exported" in json.loads((out / "latency_t1.json").read_text())
