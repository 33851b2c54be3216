"""Neighbour exchange on gloo with real processes: gossip reaches the exact average, row messages
arrive intact, and every byte sent is counted."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import build_topology


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, topo_name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        topo = build_topology(topo_name, world)
        ex = NeighborExchange(rank, topo.neighbors[rank], num_rows_hint=1000)
        # dense gossip: x <- sum_j W_ij x_j, repeated, converges to the average of the start values
        x = torch.arange(5, dtype=torch.float64) * (rank + 1) + rank ** 2
        start_mean = sum(torch.arange(5, dtype=torch.float64) * (r + 1) + r ** 2
                         for r in range(world)) / world
        for _ in range(200):
            got = ex.dense(x)
            x = topo.self_weight(rank) * x + sum(w * got[j] for j, w in topo.neighbor_weights(rank).items())
        dense_bytes = ex.bytes_sent
        # row messages of different sizes per rank
        rows = torch.arange(rank + 1, dtype=torch.int64) * 7 + rank
        vals = torch.full((rank + 1, 3), float(rank))
        got = ex.rows(rows, vals)
        ok_rows = all(torch.equal(r, torch.arange(j + 1) * 7 + j) and torch.equal(v, torch.full((j + 1, 3), float(j)))
                      for j, (r, v) in got.items())
        row_bytes = ex.bytes_sent - dense_bytes
        deg = len(topo.neighbors[rank])
        out[rank] = (float((x - start_mean).abs().max()), dense_bytes == 200 * deg * 5 * 8, ok_rows,
                     row_bytes == deg * (8 + (rank + 1) * (1 + 3) * 4))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("topo_name,world", [("ring", 4), ("exponential", 3), ("complete", 3)])
def test_gossip_exact_average_rows_and_byte_counts(topo_name, world):
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(world, _free_port(), topo_name, out), nprocs=world,
                       start_method="fork")
    for rank in range(world):
        err, dense_ok, rows_ok, rows_bytes_ok = out[rank]
        assert err < 1e-9, (rank, err)
        assert dense_ok and rows_ok and rows_bytes_ok
