"""Decentralized optimizers on gloo with real processes (small models, fast)."""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec import KeyedJaggedTensor

from ctrkit.comm.exchange import CommError, NeighborExchange
from ctrkit.comm.topology import build_topology
from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
from ctrkit.optim.decentralized import DecentralizedOptimizer
from ctrkit.optim.sparse import RowSparseAdam

ROWS, TOUCHED = 50, 40      # ids < TOUCHED are used; rows TOUCHED.. never are


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = BatchedEmbeddingBags([table_config("t0", "f0", ROWS, 4),
                                         table_config("t1", "f1", ROWS, 4)], init_std=0.1)
        self.lin = nn.Linear(8, 1)

    def forward(self, kjt):
        return self.lin(self.emb(kjt).reshape(kjt.stride(), -1)).squeeze(1)


def _batch(gen, b=32):
    ids = torch.randint(0, TOUCHED, (2 * b,), generator=gen)
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=ids, lengths=torch.ones(2 * b, dtype=torch.int32),
                            stride=b)
    return kjt, (torch.rand(b, generator=gen) < 0.3).float()


def _init(rank, world, port, timeout=60):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))


def _gather(t):
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def _run_damsgrad(rank, world, port, algorithm, out):
    _init(rank, world, port)
    try:
        torch.manual_seed(0)                       # identical replicas at start
        model = Tiny()
        init = model.emb.weight.detach().clone()
        topo = build_topology("ring", world)
        ex = NeighborExchange(rank, topo.neighbors[rank], num_rows_hint=2 * ROWS)
        if algorithm == "local_adam":
            opts = [RowSparseAdam([model.emb.weight], lr=0.01),
                    torch.optim.Adam(model.lin.parameters(), lr=0.01)]
        else:
            opts = [DecentralizedOptimizer(model, algorithm, topo, rank, ex, dense_lr=0.01,
                                           sparse_lr=0.01)]
        gen = torch.Generator().manual_seed(100 + rank)   # each worker its own data
        for _ in range(40):
            kjt, y = _batch(gen)
            loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), y)
            loss.backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        w = model.emb.weight.detach()
        untouched = torch.cat([torch.arange(TOUCHED, ROWS), ROWS + torch.arange(TOUCHED, ROWS)])
        bit_identical = torch.equal(w[untouched], init[untouched])
        if algorithm == "local_adam":
            second = opts[1].state[model.lin.weight]["exp_avg_sq"]
        else:
            second = opts[0].state[model.lin.weight].get("u", torch.ones(1))   # dpsgd: none
        allw = _gather(second.clamp(min=1e-8).rsqrt())   # effective learning rate per coordinate
        spread = float(((allw.max(0).values - allw.min(0).values) / allw.mean(0)).max())
        dist_x = float((_gather(model.lin.weight.detach()) - model.lin.weight.detach()).abs().max())
        out[rank] = (bit_identical, spread, dist_x, ex.bytes_sent)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *args):
    out = mp.Manager().dict()
    mp.start_processes(fn, args=(world, _port(), *args, out), nprocs=world, start_method="fork")
    return [out[r] for r in range(world)]


def test_damsgrad_tracker_keeps_learning_rates_consistent_and_untouched_rows_identical():
    dams = _spawn(_run_damsgrad, 4, "damsgrad")
    local = _spawn(_run_damsgrad, 4, "local_adam")
    assert all(r[0] for r in dams)                       # never-touched rows: bit-identical
    dams_spread, local_spread = dams[0][1], local[0][1]
    assert dams_spread < 0.15 and dams_spread < local_spread / 2.5, (dams_spread, local_spread)
    assert all(r[3] > 0 for r in dams)


def test_dpsgd_runs_and_keeps_replicas_close():
    res = _spawn(_run_damsgrad, 3, "dpsgd")
    assert all(r[0] for r in res)
    assert res[0][2] < 0.05


def _dies(rank, world, port, out):
    _init(rank, world, port, timeout=5)
    topo = build_topology("ring", world)
    ex = NeighborExchange(rank, topo.neighbors[rank])
    ex.dense(torch.ones(3))
    if rank == 1:
        os._exit(1)                                      # a worker dies mid-run
    t = time.time()
    try:
        for _ in range(3):
            ex.dense(torch.ones(3))
        out[rank] = ("no error", 0.0)
    except CommError as e:
        out[rank] = (str(e), time.time() - t)


def test_dead_rank_ends_peers_with_a_message():
    out = mp.Manager().dict()
    ctx = mp.start_processes(_dies, args=(2, _port(), out), nprocs=2, start_method="fork", join=False)
    ctx.processes[0].join(60)
    assert not ctx.processes[0].is_alive()
    msg, waited = out[0]
    assert "neighbour exchange" in msg and "rank 0" in msg and "with rank 1" in msg   # the peer
    assert waited < 30
    for p in ctx.processes:
        p.join(5)


def _replicas(rank, world, port, seeds, out):
    from ctrkit.distributed.runtime import DistEnv, check_identical_replicas
    from ctrkit.errors import CtrkitError
    _init(rank, world, port)
    torch.manual_seed(seeds[rank])
    model = Tiny()
    try:
        check_identical_replicas(model, DistEnv(rank, world))
        out[rank] = "ok"
    except CtrkitError as e:
        out[rank] = str(e)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [(0, 0, 0), (0, 0, 1)])
def test_replicas_must_start_identical(seeds):
    out = mp.Manager().dict()
    mp.start_processes(_replicas, args=(3, _port(), seeds, out), nprocs=3, start_method="fork")
    if len(set(seeds)) == 1:
        assert dict(out) == {0: "ok", 1: "ok", 2: "ok"}
    else:
        assert "differ from rank 2's at the start" in out[0], dict(out)
        assert "rank 2: its dense parameters differ from rank 0's" in out[2], dict(out)
