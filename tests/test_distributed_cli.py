"""`ctrkit train ... distributed.workers=2` through torch's launcher, and plain torchrun."""
import json
import subprocess
import sys

import pytest

from ctrkit.data.synth import write_synthetic


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("draw")
    write_synthetic(d, 6000, valid_rows=1000, test_rows=1000, seed=2, card_scale=0.01, progress=False)
    return d


def _last(run, rank):
    """A rank's checkpoint of the newest step every rank has written."""
    from ctrkit.train.checkpoint import last_rank_checkpoint
    return last_rank_checkpoint(run / "checkpoints", rank)


def _args(raw, tmp_path, *extra):
    return [f"data.train={raw / 'train.tsv'}", f"data.valid={raw / 'valid.tsv'}",
            f"data.test={raw / 'test.tsv'}", f"data.prepared_dir={tmp_path / 'prep'}",
            f"train.run_dir={tmp_path / 'run'}", "model.hidden_units=[32]", "train.batch_size=256",
            "train.eval_every=10", "train.epochs=4", "optimizer.dense.lr=3e-3",
            "optimizer.sparse.lr=3e-3", "train.tensorboard=false", "train.plot=false",
            "distributed.timeout_s=60", "train.device=cpu", "train.early_stop.enabled=false", *extra]


@pytest.mark.parametrize("algorithm", ["damsgrad", "allreduce", "allreduce train.ema_decay=0.9"])
def test_launcher_runs_two_ranks(raw, tmp_path, algorithm):
    algorithm, *extra = algorithm.split()
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *_args(raw, tmp_path, *extra),
                        "distributed.workers=2", f"distributed.algorithm={algorithm}", "--quiet",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if extra:   # allreduce keeps the replicas equal, so every rank's weight average is the same
        import torch
        from ctrkit.train.checkpoint import load_checkpoint
        a, b = (load_checkpoint(_last(tmp_path / "run", i))["ema"] for i in (0, 1))
        assert a["step"] == b["step"] == m["steps"]
        for x, y in zip(a["tables"] + a["dense"], b["tables"] + b["dense"]):
            assert torch.allclose(x, y, atol=1e-6)
    assert m["workers"] == 2 and m["algorithm"] == algorithm
    assert m["samples"] == 24000 and m["valid"]["auc"] > 0.55
    assert m["bytes_per_worker_step"] > 0
    assert _last(tmp_path / "run", 1).is_file()
    if algorithm == "allreduce":
        assert m["consensus_dense"] == 0 and m["auc_spread"] == 0


def test_torchrun_module_entry(raw, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "ctrkit", "train", *_args(raw, tmp_path),
                        "distributed.algorithm=dpsgd", "optimizer.dense.lr=0.1",
                        "optimizer.sparse.lr=0.1", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["workers"] == 2 and m["algorithm"] == "dpsgd"


def test_two_node_torchrun_with_rendezvous_endpoint(raw, tmp_path):
    """Multi-node form: two torchrun agents (one per "node") meet at a c10d rendezvous endpoint."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "t2n",
           "-m", "ctrkit", "train", *_args(raw, tmp_path), "distributed.algorithm=damsgrad",
           "train.epochs=1", "--quiet"]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outs = [a.communicate(timeout=300) for a in agents]
    for a, (_, err) in zip(agents, outs):
        assert a.returncode == 0, err[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["workers"] == 2 and m["algorithm"] == "damsgrad" and m["steps"] == 12


def test_invalid_topology_rejected_before_launch(raw, tmp_path):
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *_args(raw, tmp_path),
                        "distributed.workers=3", "distributed.algorithm=damsgrad",
                        "distributed.topology=edges", "distributed.edges=[[0,1],[1,5]]", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "outside [0, 3)" in r.stderr and "Traceback" not in r.stderr


def _assert_uninterrupted_run_matches(full_args, tmp_path, steps):
    """Run `full_args` (run_dir tmp_path/full) and check each rank's last checkpoint equals the
    interrupted run's in tmp_path/run: same step, bit-identical model."""
    import torch
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *full_args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):
        a = torch.load(_last(tmp_path / "run", rank), weights_only=False)
        b = torch.load(_last(tmp_path / "full", rank), weights_only=False)
        assert a["step"] == b["step"] == steps
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_distributed_resume_equals_uninterrupted(raw, tmp_path):
    """Each rank resumes from its own checkpoint (model, moments, tracker, public copies, data
    position) and ends bit-identical to an uninterrupted damsgrad run."""
    base = _args(raw, tmp_path, "distributed.workers=2", "distributed.algorithm=damsgrad",
                 "train.epochs=1", "--quiet")
    full = [a.replace(str(tmp_path / "run"), str(tmp_path / "full")) for a in base]
    for extra in (["train.max_steps=6"], ["train.resume=true"]):
        r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *base, *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    _assert_uninterrupted_run_matches(full, tmp_path, steps=12)   # 6000 rows / 2 ranks / 256


def test_torchrun_restart_resumes_from_the_last_checkpoint(raw, tmp_path):
    """Rank 1 dies at step 15 of the first attempt; torchrun restarts both ranks, which resume from
    their step-10 checkpoints and end bit-identical to a run that never failed."""
    import os
    base = _args(raw, tmp_path, "distributed.workers=2", "distributed.algorithm=damsgrad",
                 "train.epochs=2", "distributed.max_restarts=1", "--quiet")
    full = [a.replace(str(tmp_path / "run"), str(tmp_path / "full")) for a in base]
    env = dict(os.environ, CTRKIT_TEST_KILL="1:15")
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *base], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["steps"] == 24
    _assert_uninterrupted_run_matches(full, tmp_path, steps=24)


def test_torchrun_restarts_with_shared_store_are_refused(monkeypatch):
    """A restarted rank would read the failed attempt's addresses from torchrun's shared store
    and hang; the run says so at start instead."""
    from ctrkit.config import Config
    from ctrkit.distributed.runtime import init_distributed
    from ctrkit.errors import CtrkitError
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "2",
                 "TORCHELASTIC_USE_AGENT_STORE": "True"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CtrkitError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        init_distributed(Config())


@pytest.mark.slow
def test_rank_dying_before_its_checkpoint_restarts_from_a_step_every_rank_has(raw, tmp_path):
    """Rank 1 dies as it starts to save step 10 while rank 0 has saved it: the step never counts
    (no marker), both ranks restart from step 5 and end bit-identical to a run that never
    failed."""
    import os
    base = _args(raw, tmp_path, "distributed.workers=2", "distributed.algorithm=damsgrad",
                 "train.epochs=1", "train.eval_every=0", "train.checkpoint_every=5",
                 "distributed.max_restarts=1", "--quiet")
    full = [a.replace(str(tmp_path / "run"), str(tmp_path / "full")) for a in base]
    env = dict(os.environ, CTRKIT_TEST_KILL="1:10:save")
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *base], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 12
    _assert_uninterrupted_run_matches(full, tmp_path, steps=12)
    left = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("last-step*"))
    assert left == ["last-step00000012-rank0.pt", "last-step00000012-rank1.pt"]


@pytest.mark.slow
def test_hung_rank_is_named(raw, tmp_path):
    """Rank 1 stops answering at step 3: rank 0 names it and the exchange within
    timeout_s plus a few seconds of training starting; the launcher's line names it too."""
    import os
    import threading
    import time
    env = dict(os.environ, CTRKIT_TEST_HANG="1:3")
    args = [a for a in _args(raw, tmp_path, "distributed.workers=2", "distributed.algorithm=damsgrad",
                             "train.epochs=1", "--quiet") if not a.startswith("distributed.timeout_s")]
    p = subprocess.Popen([sys.executable, "-m", "ctrkit", "train", *args, "distributed.timeout_s=5"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []   # (time, line) as they arrive
    reader = threading.Thread(target=lambda: lines.extend((time.time(), ln) for ln in p.stderr))
    reader.start()
    started = None
    while p.poll() is None and started is None:
        if (tmp_path / "run" / "metrics.csv").exists():   # rank 0 is about to take step 1
            started = time.time()
        time.sleep(0.05)
    p.wait(timeout=120)
    reader.join(10)
    text = "".join(ln for _, ln in lines)
    assert p.returncode == 2 and started is not None, text
    named = [(t, ln) for t, ln in lines if "rank 1 stopped answering" in ln]
    assert named and "neighbour exchange" in named[0][1], text
    assert named[0][0] - started < 5 + 10, named[0][0] - started
    last = text.strip().splitlines()[-1]
    assert "distributed run failed" in last and "rank 1 stopped answering" in last, text
    assert "Traceback" not in text


@pytest.mark.slow
def test_sigint_to_a_distributed_run_is_one_line_and_resumable(raw, tmp_path):
    import os
    import signal
    import time
    base = _args(raw, tmp_path, "distributed.workers=2", "distributed.algorithm=damsgrad",
                 "train.epochs=40", "train.eval_every=0", "--quiet")
    p = subprocess.Popen([sys.executable, "-m", "ctrkit", "train", *base], stderr=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not (tmp_path / "run" / "metrics.csv").exists():
        assert time.time() - t0 < 120
        time.sleep(0.2)
    time.sleep(3)
    os.killpg(p.pid, signal.SIGINT)     # what Ctrl-C in a terminal does: every process gets it
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "resume with: ctrkit train" in lines[0], err
    from ctrkit.train.checkpoint import marked_step
    step = marked_step(tmp_path / "run" / "checkpoints")
    assert step and step % 10 == 0 and _last(tmp_path / "run", 1).is_file()
    assert f"interrupted at step {step}" in lines[0]
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *base, "train.resume=true",
                        "train.max_steps=" + str(step + 2)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("valid  AUC") == 1     # the final metrics, printed once
