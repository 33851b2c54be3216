"""Sharded tables inside shard groups with decentralized replicas, on gloo (4 ranks = 2 x 2)."""
import torch
import torch.distributed as dist
from torch import nn
from torchrec import KeyedJaggedTensor

from ctrkit.comm.exchange import NeighborExchange
from ctrkit.comm.topology import build_topology
from ctrkit.distributed.sharding import (ShardedEmbeddingBags, average_dense_grads, lift_topology,
                                         load_model, make_grid, save_model, shard_model)
from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
from ctrkit.optim.decentralized import DecentralizedOptimizer

from test_decentralized import _init, _spawn

T, D, B, STEPS = 5, 4, 16, 3
SIZES = [40 + 10 * i for i in range(T)]


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = BatchedEmbeddingBags([table_config(f"t{i}", f"f{i}", n, D)
                                         for i, n in enumerate(SIZES)], init_std=0.1)
        self.lin = nn.Linear(T * D, 1)

    def forward(self, kjt):
        return self.lin(self.emb(kjt).reshape(kjt.stride(), -1)).squeeze(1)


def _batch(seed, b=B):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 30, (b,), generator=gen) for _ in SIZES])
    kjt = KeyedJaggedTensor(keys=[f"f{i}" for i in range(T)], values=ids,
                            lengths=torch.ones(T * b, dtype=torch.int32), stride=b)
    return kjt, (torch.rand(b, generator=gen) < 0.3).float()


def _union(seeds):
    """One batch holding the given batches, samples in order."""
    parts = [_batch(s) for s in seeds]
    per = [kjt.values().view(T, B) for kjt, _ in parts]
    ids = torch.cat(per, dim=1).reshape(-1)
    n = B * len(parts)
    kjt = KeyedJaggedTensor(keys=[f"f{i}" for i in range(T)], values=ids,
                            lengths=torch.ones(T * n, dtype=torch.int32), stride=n)
    return kjt, torch.cat([y for _, y in parts])


def _tables(model):
    return {t.name: model.emb.table_weight(i).detach().clone() for i, t in enumerate(model.emb.tables)}


def _seed(step, rank):
    return 1000 * step + rank


def _sharded_run(rank, world, port, ckpt_in, ckpt_out, out):
    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = Wide()
        full = _tables(model)
        grid = make_grid(rank, world, 2)
        shard_model(model, grid)
        assert isinstance(model.emb, ShardedEmbeddingBags)
        # forward equals the unsharded model's on this rank's batch
        torch.manual_seed(0)
        ref = Wide()
        kjt, _ = _batch(_seed(0, rank))
        with torch.no_grad():
            fwd = float((model(kjt) - ref(kjt)).abs().max())
        topo = lift_topology(build_topology("ring", grid.groups), grid.k)
        ex = NeighborExchange(rank, topo.neighbors[rank], num_rows_hint=max(SIZES))
        opt = DecentralizedOptimizer(model, "damsgrad", topo, rank, ex, dense_lr=0.01, sparse_lr=0.01)
        for step in range(STEPS):
            kjt, y = _batch(_seed(step, rank))
            nn.functional.binary_cross_entropy_with_logits(model(kjt), y).backward()
            average_dense_grads(model, grid)
            opt.step()
            opt.zero_grad(set_to_none=True)
        shards = {n: p.detach().clone() for n, p in zip(model.emb.shard_names, model.emb.sharded_tables)}
        dense = {k: v.clone() for k, v in model.lin.state_dict().items()}
        if grid.group == 0:
            save_model(model, ckpt_out, group=grid.shard_pg)
        # a k = 1 checkpoint loads into the sharded model
        load_model(model, ckpt_in, group=grid.shard_pg)
        loaded = {n: p.detach().clone() for n, p in zip(model.emb.shard_names, model.emb.sharded_tables)}
        out[rank] = (fwd, shards, dense, loaded, model.embedding_bytes_per_rank, full)
    finally:
        dist.destroy_process_group()


def _replicated_run(rank, world, port, out):
    """Worker g is fed the union of the batches of ranks 2g and 2g+1 of the sharded run."""
    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = Wide()
        topo = build_topology("ring", world)
        ex = NeighborExchange(rank, topo.neighbors[rank], num_rows_hint=max(SIZES))
        opt = DecentralizedOptimizer(model, "damsgrad", topo, rank, ex, dense_lr=0.01, sparse_lr=0.01)
        for step in range(STEPS):
            kjt, y = _union([_seed(step, 2 * rank), _seed(step, 2 * rank + 1)])
            nn.functional.binary_cross_entropy_with_logits(model(kjt), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[rank] = (_tables(model), {k: v.clone() for k, v in model.lin.state_dict().items()})
    finally:
        dist.destroy_process_group()


def test_sharded_2x2_matches_replicated_union_and_checkpoints_reshard(tmp_path):
    torch.manual_seed(7)
    single = Wide()                        # a k = 1 model with other weights, saved for loading
    save_model(single, tmp_path / "k1")
    k1_tables = _tables(single)
    res = _spawn(_sharded_run, 4, str(tmp_path / "k1"), str(tmp_path / "k2"))
    ref = _spawn(_replicated_run, 2)

    assert all(r[0] == 0.0 for r in res), [r[0] for r in res]   # forward bit for bit
    for rank, (_, shards, dense, loaded, per_rank, full) in enumerate(res):
        g = rank // 2
        ref_tables, ref_dense = ref[g]
        for name, w in shards.items():
            torch.testing.assert_close(w, ref_tables[name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loaded[name], k1_tables[name], rtol=0, atol=0)
        for k, v in dense.items():
            torch.testing.assert_close(v, ref_dense[k], rtol=1e-5, atol=1e-6)
    # every table is held by exactly one rank of a group, and each rank holds about half
    held = [set(res[r][1]) for r in (0, 1)]
    assert held[0].isdisjoint(held[1]) and held[0] | held[1] == {f"t{i}" for i in range(T)}
    per_rank = res[0][4]
    assert max(per_rank) <= 0.7 * sum(per_rank)

    # the 2 x 2 checkpoint (group 0's averaged... here: group 0's model) loads into one process
    one = Wide()
    load_model(one, tmp_path / "k2")
    for rank in (0, 1):
        for name, w in res[rank][1].items():
            torch.testing.assert_close(one.emb.table_weight(int(name[1:])), w, rtol=0, atol=0)
    for k, v in res[0][2].items():
        torch.testing.assert_close(one.lin.state_dict()[k], v, rtol=0, atol=0)


def test_train_cli_2x2_sharded_run_and_single_process_eval(tmp_path):
    """`ctrkit train ... distributed.workers=4 distributed.shard_group_size=2` with choco: the
    plan is printed, the run trains, resumes, evaluates the averaged model, and its best model is
    a torch.distributed.checkpoint that `ctrkit eval` loads into one process and another layout
    starts from."""
    import json
    import subprocess
    import sys
    from ctrkit.data.synth import write_synthetic
    raw = tmp_path / "raw"
    write_synthetic(raw, 4000, valid_rows=800, test_rows=800, seed=3, card_scale=0.01, progress=False)
    args = [f"data.train={raw / 'train.tsv'}", f"data.valid={raw / 'valid.tsv'}",
            f"data.test={raw / 'test.tsv'}", f"data.prepared_dir={tmp_path / 'prep'}",
            f"train.run_dir={tmp_path / 'run'}", "model.hidden_units=[16]", "model.embedding_dim=4",
            "train.batch_size=128", "train.eval_every=4", "train.max_steps=8",
            "train.tensorboard=false", "train.plot=false", "distributed.timeout_s=60",
            "train.device=cpu"]
    sharded = [*args, "distributed.workers=4", "distributed.shard_group_size=2",
               "distributed.algorithm=choco", "train.checkpoint_every=4"]
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *sharded, "train.max_steps=4",
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # each rank resumes its own shard and optimizer state, then trains on to step 8
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", *sharded, "train.resume=true",
                        "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 shard groups of 2 ranks" in r.stdout and "bytes per rank" in r.stdout
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["shard_group_size"] == 2 and m["workers"] == 4 and m["valid"]["auc"] > 0.5
    assert m["steps"] == 8 and m["algorithm"] == "choco" and m["compression_ratio"] > 1
    # the ranks of a shard group hold one worker's dense parameters: the same after compressed
    # gossip (the messages are seeded by worker, not by rank)
    import torch
    from ctrkit.train.checkpoint import last_rank_checkpoint
    ck = tmp_path / "run" / "checkpoints"
    a, b = (torch.load(last_rank_checkpoint(ck, r), weights_only=False)["model"] for r in (0, 1))
    dense = [k for k in a if not k.startswith(("embedding", "linear.weights"))]
    assert dense and all(torch.equal(a[k], b[k]) for k in dense), dense
    per_rank = m["embedding_bytes_per_rank"]
    assert len(per_rank) == 2 and max(per_rank) < 0.75 * sum(per_rank)
    best = tmp_path / "run" / "checkpoints" / "best"
    assert (best / ".metadata").is_file()
    e = subprocess.run([sys.executable, "-m", "ctrkit", "eval", *args, f"--checkpoint={best}",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr[-3000:]
    ev = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # one process, the whole model: the same AUC the sharded group 0 measured
    assert abs(ev["valid"]["auc"] - m["valid"]["auc"]) < 1e-9
    # ... and into a run with another layout: 2 ranks as one model-parallel group (k = 2)
    r2 = subprocess.run([sys.executable, "-m", "ctrkit", "train", *args, "distributed.workers=2",
                         "distributed.shard_group_size=2", "distributed.algorithm=damsgrad",
                         f"train.init_from={best}", f"train.run_dir={tmp_path / 'run2'}",
                         "train.max_steps=1", "optimizer.dense.lr=1e-6", "optimizer.sparse.lr=1e-6",
                         "--quiet"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert abs(m2["valid"]["auc"] - m["valid"]["auc"]) < 2e-3
