"""`allreduce` with damsgrad's base optimizer (distributed.base_optimizer=amsgrad), and the wire
bytes of allreduce's collectives (issue 15: like-for-like bytes, the same base optimizer)."""
import json
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from ctrkit.comm.collective import collective_wire_bytes
from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import build_topology, single_worker
from ctrkit.config import load_config
from ctrkit.data.synth import write_synthetic
from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
from ctrkit.optim.decentralized import DecentralizedOptimizer
from ctrkit.train.checkpoint import load_checkpoint, last_rank_checkpoint

ROWS = 3000   # 128 per batch: 23 steps per epoch on one worker


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("amsgrad_data")
    write_synthetic(d / "raw", ROWS, valid_rows=500, test_rows=0, seed=3, card_scale=0.01,
                    progress=False)
    return d


def _overrides(data, run, *extra):
    return [f"data.train={data / 'raw' / 'train.tsv'}", f"data.valid={data / 'raw' / 'valid.tsv'}",
            f"data.prepared_dir={data / 'prep'}", f"train.run_dir={run}", "model.hidden_units=[16]",
            "model.embedding_dim=4", "train.batch_size=128", "train.epochs=1", "train.max_steps=12",
            "train.eval_every=6", "optimizer.dense.lr=3e-3", "optimizer.sparse.lr=3e-3",
            "train.progress=false", "train.tensorboard=false", "train.plot=false",
            "train.threads=1", "train.device=cpu", "train.early_stop.enabled=false",
            "train.prefetch=0", "distributed.timeout_s=60", *extra]


def _cfg(data, run, *extra):
    return load_config(None, _overrides(data, run, *extra))


def _same_state(a, b):
    """Bit-identical nested checkpoint state (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------- the pieces

def test_collective_wire_bytes():
    assert collective_wire_bytes("all_reduce", 1000, 4) == 1500      # 2 (n - 1) / n * N
    assert collective_wire_bytes("all_reduce", 1000, 2) == 1000
    assert collective_wire_bytes("all_gather", 100, 4) == 300        # (n - 1) * c
    assert collective_wire_bytes("all_reduce", 1000, 1) == collective_wire_bytes("all_gather", 8, 1) == 0
    with pytest.raises(ValueError, match="unknown collective"):
        collective_wire_bytes("broadcast", 10, 2)
    with pytest.raises(ValueError):
        collective_wire_bytes("all_gather", 10, 0)


def test_single_worker_topology_has_no_neighbours():
    t = single_worker()
    assert t.n == 1 and t.neighbors == ((),) and t.self_weight(0) == 1.0 and t.neighbor_weights(0) == {}
    ring = build_topology("ring", 1)   # what damsgrad runs on at n = 1
    assert t.neighbors == ring.neighbors and np.array_equal(t.weights, ring.weights)


@pytest.mark.parametrize("algorithm", ["damsgrad", "dpsgd", "choco"])
def test_amsgrad_base_is_refused_with_gossip_algorithms(capsys, algorithm):
    from ctrkit.cli import main
    code = main(["train", f"distributed.algorithm={algorithm}", "distributed.base_optimizer=amsgrad",
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"distributed.base_optimizer=amsgrad: only with algorithm allreduce or local, not {algorithm}" in err
    for ok in ("allreduce", "local"):
        assert load_config(None, [f"distributed.algorithm={ok}",
                                  "distributed.base_optimizer=amsgrad"]).distributed.base_optimizer == "amsgrad"


# ---------------------------------------------------------------- n = 1: damsgrad bit for bit

@pytest.mark.parametrize("algorithm,extra", [
    ("allreduce", ()),
    ("local", ("distributed.rowwise_tracker=true", "distributed.bias_correction=true",
               "distributed.eps=1e-8", "optimizer.dense.name=sgd")),
])
def test_amsgrad_base_at_one_worker_is_damsgrad_bit_for_bit(data, tmp_path, algorithm, extra):
    """A worker without neighbours: allreduce (or local) + amsgrad takes damsgrad's steps exactly,
    with the distributed.* options of the step honoured (rowwise tracker, bias correction, eps),
    whatever optimizer.dense/sparse name; the configured Adam does something else."""
    from ctrkit.train.run import train
    runs = {}
    for name, over in (("damsgrad", ["distributed.algorithm=damsgrad"]),
                       ("base", [f"distributed.algorithm={algorithm}",
                                 "distributed.base_optimizer=amsgrad"]),
                       ("adam", [f"distributed.algorithm={algorithm}"])):
        m = train(_cfg(data, tmp_path / name, *over, *extra)).metrics
        runs[name] = (m, load_checkpoint(tmp_path / name / "checkpoints" / "last.pt"))
    (md, d), (mb, b), (_, a) = runs["damsgrad"], runs["base"], runs["adam"]
    assert d["step"] == b["step"] == 12
    assert _same_state(d["model"], b["model"])
    assert _same_state(d["optimizers"], b["optimizers"])          # moments, tracker, public copies
    assert md["valid"] == mb["valid"]
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_amsgrad_base_resumes_bit_for_bit(data, tmp_path):
    from ctrkit.train.run import train
    over = ("distributed.algorithm=allreduce", "distributed.base_optimizer=amsgrad")
    train(_cfg(data, tmp_path / "full", *over))
    train(_cfg(data, tmp_path / "part", *over, "train.max_steps=5"))
    train(_cfg(data, tmp_path / "part", *over, "train.resume=true"))
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert a["step"] == b["step"] == 12
    assert _same_state(a["model"], b["model"]) and _same_state(a["optimizers"], b["optimizers"])


# ---------------------------------------------------------------- n ranks on gloo

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _np(t):
    return t.detach().to(torch.float64).numpy().copy()


def _rank(rank, world, port, data, run, extra, steps, out):
    """Real Trainer steps on gloo; records per step this rank's local gradients (rows_and_grads of
    the tables, as average_gradients reads them), the averaged gradients the optimizer sees, the
    parameters after the step, and the bytes counted."""
    import torch.distributed as dist

    import ctrkit.optim.decentralized as dec
    from ctrkit.data.schema import Schema
    from ctrkit.distributed.runtime import DistEnv
    from ctrkit.optim.build import split_parameters
    from ctrkit.optim.sparse import rows_and_grads
    from ctrkit.train.trainer import Trainer
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        cfg = _cfg(data, run, f"distributed.workers={world}", *extra)
        tr = Trainer(cfg, Schema.load(data / "prep"), run, DistEnv(rank, world))
        tables = {id(p) for p in split_parameters(tr.model)[0]}
        names = {id(p): n for n, p in tr.model.named_parameters()}
        params = [p for p in tr.model.parameters() if p.requires_grad]

        def grads():
            g = {}
            for p in params:
                if id(p) in tables:
                    r, v = rows_and_grads(p.grad)
                    g[names[id(p)]] = (r.numpy().copy(), _np(v))
                else:
                    g[names[id(p)]] = _np(p.grad) if p.grad is not None else np.zeros(tuple(p.shape))
            return g
        rec = {"x0": {names[id(p)]: _np(p) for p in params}, "tables": [names[i] for i in tables],
               "local": [], "avg": [], "x": [], "bytes": [], "lr": [], "lr_scale": tr.rates.scale}
        average = dec.average_gradients

        def recording_average(model, n):
            rec["local"].append(grads())
            return average(model, n)
        dec.average_gradients = recording_average
        opt = tr.optimizers[0]
        opt_step = opt.step

        def recording_step(*a, **k):
            rec["avg"].append(grads() if tr.strategy.name == "allreduce" else None)
            rec["lr"].append({g["sparse"]: g["lr"] for g in opt.param_groups})
            return opt_step(*a, **k)
        opt.step = recording_step
        for i, batch in enumerate(tr.train_loader):
            if i == steps:
                break
            before = dict(tr.strategy.collective)
            tr.train_step(batch)
            tr.step += 1
            rec["x"].append({names[id(p)]: _np(p) for p in params})
            rec["bytes"].append({k: v - before.get(k, 0) for k, v in tr.strategy.collective.items()})
        rec["traffic"] = tr.strategy.traffic(tr.step)
        rec["bytes_sent"] = tr.strategy.bytes_sent
        rec["algorithm"] = tr.strategy.name
        out[rank] = rec
    finally:
        dec.average_gradients = average
        dist.destroy_process_group()


def _spawn(world, data, run, extra, steps=3):
    import torch.multiprocessing as mp
    out = mp.Manager().dict()
    mp.start_processes(_rank, args=(world, _port(), data, run, tuple(extra), steps, out),
                       nprocs=world, start_method="fork")
    return [out[r] for r in range(world)]


@pytest.fixture(scope="module")
def prepared(data):
    from ctrkit.data.preprocess import prepare
    prepare(_cfg(data, data / "unused"), progress=False)
    return data


def _dense_table(rows, vals, shape):
    t = np.zeros(shape)
    t[rows] = vals
    return t


def _amsgrad_reference(rec, betas, eps, rowwise, bias_correction):
    """Float64 AMSGrad (DESIGN.md's step at n = 1: no gossip, u = vhat) on the averaged gradients
    the rank recorded; returns the parameters after each step. Tables: only the rows in the
    averaged gradient change (lazy moments), with one second moment per row when `rowwise`."""
    b1, b2 = betas
    x = {k: v.copy() for k, v in rec["x0"].items()}
    st = {}
    out = []
    for t, (avg, lrs) in enumerate(zip(rec["avg"], rec["lr"]), start=1):
        fix = math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if bias_correction else 1.0
        for k in x:
            if k in rec["tables"]:
                rows, g = avg[k]
                if k not in st:
                    dv = 1 if rowwise else x[k].shape[1]
                    st[k] = [np.zeros_like(x[k]), np.zeros((x[k].shape[0], dv)),
                             np.zeros((x[k].shape[0], dv))]
                m, v, vh = st[k]
                g2 = g ** 2
                if rowwise:
                    g2 = g2.mean(axis=1, keepdims=True)
                m[rows] = b1 * m[rows] + (1 - b1) * g
                v[rows] = b2 * v[rows] + (1 - b2) * g2
                vh[rows] = np.maximum(vh[rows], v[rows])
                x[k][rows] -= lrs[True] * fix * m[rows] / np.sqrt(np.maximum(vh[rows], eps))
            else:
                g = avg[k]
                m, v, vh = st.setdefault(k, [np.zeros_like(g), np.zeros_like(g), np.zeros_like(g)])
                m[...] = b1 * m + (1 - b1) * g
                v[...] = b2 * v + (1 - b2) * g ** 2
                vh[...] = np.maximum(vh, v)
                x[k] -= lrs[False] * fix * m / np.sqrt(np.maximum(vh, eps))
        out.append({k: v.copy() for k, v in x.items()})
    return out


@pytest.mark.parametrize("world,extra", [
    (2, ()),
    (2, ("distributed.rowwise_tracker=true", "distributed.bias_correction=true")),
    (3, ()),
])
def test_allreduce_amsgrad_ranks_stay_identical_and_follow_float64_amsgrad(prepared, tmp_path,
                                                                           world, extra):
    """What is exact and what is not, per step:
    - the replicas (parameters after every step) are bit-identical on all ranks;
    - at n = 2 the averaged gradient is bit-exactly the float64 mean of the ranks' gradients
      rounded to float32 (g0/2 + g1/2 is one rounding), at n = 3 equal to it within float32;
    - the step is AMSGrad without bias correction (unless asked for) on that average: within
      float32 rounding of a float64 reference fed the same averaged gradients. A single-process
      run on the union batch is not bit-exact (its gradient sums in another order), so it is not
      the reference;
    - lr_scaling=auto scales both parts by sqrt(n), even with optimizer.dense.name=sgd (the step
      is AMSGrad's);
    - payload and wire bytes per step follow from the ranks' row counts exactly."""
    over = ("distributed.algorithm=allreduce", "distributed.base_optimizer=amsgrad",
            "distributed.lr_scaling=auto", "optimizer.dense.name=sgd", *extra)
    recs = _spawn(world, prepared, tmp_path / "run", over)
    cfg = _cfg(prepared, tmp_path / "run", *over)
    dc = cfg.distributed
    r0 = recs[0]
    assert r0["algorithm"] == "allreduce" and r0["lr_scale"] == (math.sqrt(world),) * 2
    for lrs in r0["lr"]:
        assert lrs[False] == pytest.approx(3e-3 * math.sqrt(world), rel=1e-12)
        assert lrs[True] == pytest.approx(3e-3 * math.sqrt(world), rel=1e-12)
    for other in recs[1:]:   # replicas and averaged gradients: bit-identical on every rank
        for s in range(3):
            for k in r0["x"][s]:
                assert np.array_equal(r0["x"][s][k], other["x"][s][k]), (s, k)
                a, b = r0["avg"][s][k], other["avg"][s][k]
                assert all(np.array_equal(u, v) for u, v in zip(a, b)) if k in r0["tables"] \
                    else np.array_equal(a, b), (s, k)
    for s in range(3):   # the average is the mean of the ranks' own gradients
        for k, avg in r0["avg"][s].items():
            locs = [r["local"][s][k] for r in recs]
            if k in r0["tables"]:
                shape = r0["x0"][k].shape
                mean = sum(_dense_table(*g, shape) for g in locs) / world
                got = _dense_table(*avg, shape)
                rows = np.unique(np.concatenate([g[0] for g in locs]))
                assert np.array_equal(np.sort(avg[0]), rows), (s, k)
            else:
                mean, got = sum(locs) / world, avg
            if world == 2:
                assert np.array_equal(got, mean.astype(np.float32).astype(np.float64)), (s, k)
            else:
                scale = sum(np.abs(g) for g in (_dense_table(*g, shape) if k in r0["tables"]
                                                else g for g in locs)) / world
                assert np.all(np.abs(got - mean) <= 2 ** -21 * scale), (s, k)   # a few float32 roundings
    assert not any(np.array_equal(r0["avg"][0][k], r0["local"][0][k]) for k in r0["avg"][0]
                   if k not in r0["tables"] and np.any(r0["avg"][0][k]))
    ref = _amsgrad_reference(r0, tuple(cfg.optimizer.sparse.betas), dc.eps, dc.rowwise_tracker,
                             dc.bias_correction)
    for s in range(3):
        for k in ref[s]:
            assert np.abs(ref[s][k] - r0["x0"][k]).max() > 1e-4, (s, k)   # (every part moves)
            np.testing.assert_allclose(r0["x"][s][k], ref[s][k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"step {s + 1}, {k}")
    # bytes: the dense vector all_reduce'd, per table the padded chunk and its row count gathered
    dense = 4 * sum(v.size for k, v in r0["x0"].items() if k not in r0["tables"])
    for s in range(3):
        top = {k: max(1, max(len(r["local"][s][k][0]) for r in recs)) for k in r0["tables"]}
        chunks = sum(top[k] * (8 + 4 * r0["x0"][k].shape[1]) for k in r0["tables"])
        for r in recs:
            assert r["bytes"][s]["payload_bytes"] == dense + chunks
            assert r["bytes"][s]["wire_bytes"] == pytest.approx(
                2 * (world - 1) / world * dense + (world - 1) * (chunks + 8 * len(top)), rel=1e-12)
    total = sum(b["wire_bytes"] for b in r0["bytes"])
    assert r0["traffic"] == {"payload_bytes_per_step": sum(b["payload_bytes"] for b in r0["bytes"]) / 3,
                             "wire_bytes_per_step": total / 3}
    assert r0["bytes_sent"] == pytest.approx(total, rel=1e-12)


def test_gossip_wire_bytes_are_its_messages(prepared, tmp_path):
    """damsgrad's wire_bytes_per_step is what its exchange handed to isend (bytes_per_worker_step)."""
    recs = _spawn(2, prepared, tmp_path / "run", ("distributed.algorithm=damsgrad",), steps=2)
    for r in recs:
        assert r["traffic"]["wire_bytes_per_step"] == r["bytes_sent"] / 2 > 0


def test_two_ranks_through_the_launcher(prepared, tmp_path):
    """`ctrkit train distributed.workers=2 allreduce + amsgrad`: both ranks' checkpoints hold the
    same model, and metrics.json reports payload and wire bytes (bytes_per_worker_step: wire)."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train",
                        *_overrides(prepared, run, "distributed.workers=2",
                                    "distributed.algorithm=allreduce",
                                    "distributed.base_optimizer=amsgrad", "train.max_steps=0"),
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["algorithm"] == "allreduce" and m["workers"] == 2 and m["steps"] == 12
    assert m["consensus_dense"] == 0 and m["consensus_embedding"] == 0 and m["auc_spread"] == 0
    assert 0 < m["payload_bytes_per_step"] < m["wire_bytes_per_step"] == m["bytes_per_worker_step"]
    a, b = (load_checkpoint(last_rank_checkpoint(run / "checkpoints", i)) for i in (0, 1))
    assert a["step"] == b["step"] == 12
    assert _same_state(a["model"], b["model"]) and _same_state(a["optimizers"], b["optimizers"])


class _OneTable(nn.Module):
    """One 50-row table of width 4 and a linear layer with `out` outputs (a dense vector of
    5 * out entries), summed to one logit per sample."""

    def __init__(self, out: int):
        super().__init__()
        self.emb = BatchedEmbeddingBags([table_config("t0", "f0", 50, 4)], init_std=0.1)
        self.lin = nn.Linear(4, out)

    def forward(self, kjt):
        return self.lin(self.emb(kjt).reshape(kjt.stride(), -1)).sum(1)


def _one_table_batch() -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1, 7, 7, 3]),
                             lengths=torch.ones(4, dtype=torch.int32), stride=4)


def test_a_worker_without_neighbours_keeps_no_public_copies():
    """On single_worker() gossip is the identity (s = x_hat, x never moves), so the optimizer skips
    it and holds no float64 public copies of its tables, tracker or dense vector (they were
    two float64 copies of every table: ~0.8 GB on the reference data). Its step is the one the
    gossip would give, bit for bit (checked against the code before the skip when it was made)."""
    for tol in (0.0, 0.01):
        torch.manual_seed(0)
        m = _OneTable(1)
        opt = DecentralizedOptimizer(m, "damsgrad", single_worker(), 0, NeighborExchange(0, ()),
                                     dense_lr=0.01, sparse_lr=0.01, gossip_tol=tol)
        kjt = _one_table_batch()
        before = m.emb.weight.detach().clone()
        m(kjt).sum().backward()
        opt.step()
        assert not torch.equal(before, m.emb.weight.detach())          # it did step
        assert opt.public_copy_bytes() == 0 and opt.bytes_sent == 0
        assert not any(k.endswith(("dirty", "sum")) or k.endswith("hat") and k != "vhat"
                       for st in opt.state.values() for k in st)


def test_public_copy_bytes_are_known_before_the_first_step_and_match_the_state():
    """What the trainer prints at start is what the state holds after a step (damsgrad with
    gossip_tol: tables, tracker, and the dense vector's padded blocks; exact damsgrad keeps none
    for the dense vector)."""
    # a "graph" of one worker that lists itself as a neighbour would need ranks; instead: a
    # two-node topology viewed from rank 0 with an exchange that echoes rank 0's messages
    class _Echo(NeighborExchange):
        def rows(self, rows, values):
            return {1: (rows.clone(), values.clone())}
    two = build_topology("ring", 2)
    for tol in (0.0, 0.01):
        torch.manual_seed(0)
        m = _OneTable(3)
        opt = DecentralizedOptimizer(m, "damsgrad", two, 0, _Echo(0, (1,)), dense_lr=0.01,
                                     sparse_lr=0.01, gossip_tol=tol)
        opt._mix = lambda flat: flat.clone()          # exact dense gossip: no process needed
        planned = opt.public_copy_bytes()
        kjt = _one_table_batch()
        m(kjt).sum().backward()
        opt.step()
        held = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                   if k.endswith("sum") or k.endswith("hat") and k != "vhat")
        table = 2 * 8 * (50 * 4 + 50 * 4)            # x_hat, s of the table and of its tracker
        dense = 2 * 8 * 256 * 2 if tol else 0         # 15 entries: one padded block, x and u
        assert planned == held == table + dense, (tol, planned, held)
