"""`train.device` and the backend that goes with it; GPU runs (skipped where torch sees no GPU).

The CPU tests pin down the device/backend rules. The CUDA tests train on the GPU in one process and
with two ranks sharing one GPU over gloo (host-staged messages), and compare with CPU runs.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ctrkit.data.ids import _distinct_ids_torch, distinct_ids
from ctrkit.data.synth import write_synthetic
from ctrkit.errors import CtrkitError
from ctrkit.distributed.device import resolve_backend, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")


# ---------------------------------------------------------------- rules (CPU)
def test_cpu_and_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(CtrkitError, match="train.device=cuda: torch sees no GPU"):
        resolve_device("cuda")


def test_gpu_per_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)   # a named GPU for every rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")   # more ranks than GPUs: auto means the CPU
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(CtrkitError, match="local rank 2 has no GPU of its own: this node has 2"):
        resolve_device("cuda")
    with pytest.raises(CtrkitError, match="cuda:5: this machine has 2 GPU"):
        resolve_device("cuda:5")


def test_backend_follows_device(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_backend("auto", cpu, "auto") == "gloo"
    assert resolve_backend("auto", gpu, "cuda") == "nccl"
    assert resolve_backend("auto", gpu, "cuda:0") == "gloo"   # ranks share one GPU
    assert resolve_backend("gloo", gpu, "cuda") == "gloo"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")   # one rank per node on its named GPU
    assert resolve_backend("auto", gpu, "cuda:0") == "nccl"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(CtrkitError, match="backend=nccl needs train.device=cuda"):
        resolve_backend("nccl", cpu, "cpu")
    with pytest.raises(CtrkitError, match="NCCL needs one GPU per rank"):
        resolve_backend("nccl", gpu, "cuda:0")


def test_bad_device_setting_is_a_config_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ctrkit", "train", "configs/demo.yaml",
                        "train.device=tpu", f"train.run_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "train.device" in r.stderr


def test_torch_distinct_ids_match_numpy():
    v = torch.from_numpy(np.random.default_rng(0).integers(0, 50, 400))
    a, b = distinct_ids(v), _distinct_ids_torch(v)
    for x, y in ((a.keys, b.keys), (a.inverse, b.inverse), (a.offsets, b.offsets),
                 (v[a.order], v[b.order])):   # (the order inside a group may differ)
        assert torch.equal(x, y)


# ---------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("draw")
    write_synthetic(d, 6000, valid_rows=1000, test_rows=1000, seed=2, card_scale=0.01, progress=False)
    return d


def _args(raw, tmp_path, name, *extra):
    return [f"data.train={raw / 'train.tsv'}", f"data.valid={raw / 'valid.tsv'}",
            f"data.test={raw / 'test.tsv'}", f"data.prepared_dir={tmp_path / 'prep'}",
            f"train.run_dir={tmp_path / name}", "model.hidden_units=[32]", "train.batch_size=256",
            "train.eval_every=10", "train.epochs=2", "optimizer.dense.lr=3e-3",
            "optimizer.sparse.lr=3e-3", "train.tensorboard=false", "train.plot=false",
            "train.progress=false", "train.threads=1", "distributed.timeout_s=60", *extra]


def _cfg(raw, tmp_path, name, *extra):
    from ctrkit.config import load_config
    return load_config("configs/demo.yaml", _args(raw, tmp_path, name, *extra))


def _cli(*args, timeout=300):
    r = subprocess.run([sys.executable, "-m", "ctrkit", *args, "--quiet"], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@cuda
def test_batch_moves_with_its_facts(raw, tmp_path):
    from ctrkit.data.loader import BatchLoader
    from ctrkit.data.preprocess import prepare
    schema = prepare(_cfg(raw, tmp_path, "run"), progress=False)
    host = next(iter(BatchLoader(schema, "train", 64, pin_memory=True)))
    assert host.labels.is_pinned() and host.sparse.values().is_pinned()
    gpu = host.to(torch.device("cuda"))
    assert gpu.labels.is_cuda and gpu.sparse.values().is_cuda and gpu.dense.is_cuda
    ids = gpu.facts.unique
    assert all(t.is_cuda for t in ids) and gpu.facts.one_per_bag
    assert torch.equal(ids.keys.cpu(), host.facts.unique.keys)


@cuda
def test_gpu_step_touches_only_batch_rows(raw, tmp_path):
    from ctrkit.data.loader import BatchLoader
    from ctrkit.data.preprocess import prepare
    from ctrkit.optim.build import build_optimizers
    from ctrkit.train.setup import build_training_model
    cfg = _cfg(raw, tmp_path, "run")
    schema = prepare(cfg, progress=False)
    dev = torch.device("cuda")
    model = build_training_model(cfg, schema, dev)
    opts = build_optimizers(model, cfg.optimizer)
    batch = next(iter(BatchLoader(schema, "train", 64))).to(dev)
    from ctrkit.models.embedding import BatchedEmbeddingBags
    weight = next(m.weight for m in model.modules() if isinstance(m, BatchedEmbeddingBags))
    before = weight.detach().clone()
    torch.nn.functional.binary_cross_entropy_with_logits(batch.logits(model), batch.labels).backward()
    assert weight.grad.is_sparse and weight.grad.is_cuda
    for o in opts:
        o.step()
    changed = (weight.detach() != before).any(dim=1).nonzero().squeeze(1)
    touched = weight.grad.coalesce().indices()[0]
    assert changed.numel() > 0 and set(changed.tolist()) <= set(touched.tolist())


@cuda
def test_gpu_training_matches_cpu_and_resumes(raw, tmp_path):
    from ctrkit.train.checkpoint import load_checkpoint
    from ctrkit.train.run import evaluate, train
    gpu = train(_cfg(raw, tmp_path, "gpu", "train.device=cuda", "model.dropout=0.2")).metrics
    cpu = train(_cfg(raw, tmp_path, "cpu", "train.device=cpu", "model.dropout=0.2")).metrics
    assert gpu["valid"]["auc"] > 0.6
    assert abs(gpu["valid"]["auc"] - cpu["valid"]["auc"]) < 0.01
    # resume on the GPU gives the uninterrupted run's parameters
    train(_cfg(raw, tmp_path, "part", "train.device=cuda", "model.dropout=0.2", "train.max_steps=23"))
    train(_cfg(raw, tmp_path, "part", "train.device=cuda", "model.dropout=0.2", "train.resume=true"))
    a = load_checkpoint(tmp_path / "gpu" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    # a GPU checkpoint evaluates on the CPU to the same numbers
    again = evaluate(_cfg(raw, tmp_path, "gpu", "train.device=cpu", "model.dropout=0.2"))
    assert abs(again["valid"]["auc"] - gpu["valid"]["auc"]) < 1e-4


@cuda
@pytest.mark.parametrize("algorithm", ["damsgrad", "choco", "allreduce"])
def test_two_ranks_share_one_gpu_over_gloo(raw, tmp_path, algorithm):
    """Every tensor of the step on the GPU, messages staged through host memory for gloo."""
    common = ("distributed.workers=2", f"distributed.algorithm={algorithm}")
    _cli("train", "configs/demo.yaml", *_args(raw, tmp_path, "gpu", *common, "train.device=cuda:0"))
    _cli("train", "configs/demo.yaml", *_args(raw, tmp_path, "cpu", *common, "train.device=cpu"))
    g = json.loads((tmp_path / "gpu" / "metrics.json").read_text())
    c = json.loads((tmp_path / "cpu" / "metrics.json").read_text())
    assert (g["device"], g["backend"], c["device"], c["backend"]) == ("cuda:0", "gloo", "cpu", "gloo")
    assert g["workers"] == 2 and g["valid"]["auc"] > 0.55
    assert abs(g["valid"]["auc"] - c["valid"]["auc"]) < 0.01
    assert g["bytes_per_worker_step"] == pytest.approx(c["bytes_per_worker_step"], rel=0.05)


@cuda
def test_torchrun_rank_takes_its_local_gpu_with_nccl(raw, tmp_path):
    """One rank (a one-GPU machine cannot hold two NCCL ranks): device and backend chosen under
    torchrun; NCCL traffic between GPUs is not exercised here."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "1", "-m", "ctrkit", "train", "configs/demo.yaml",
                        *_args(raw, tmp_path, "run", "train.device=auto"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["device"], m["backend"]) == ("cuda:0", "nccl") and m["valid"]["auc"] > 0.55


@cuda
def test_fused_tables_on_gpu(raw, tmp_path):
    import fbgemm_gpu
    if getattr(fbgemm_gpu, "__variant__", "") == "cpu":
        pytest.skip("fbgemm_gpu is its CPU build here (install.sh installs fbgemm-gpu with CUDA)")
    from ctrkit.train.run import train
    m = train(_cfg(raw, tmp_path, "run", "train.device=cuda", "optimizer.sparse.name=rowwise_adagrad",
                   "optimizer.sparse.fused=true", "optimizer.sparse.lr=0.05")).metrics
    assert m["valid"]["auc"] > 0.6


def test_checkpoint_of_another_model_names_the_keys(raw, tmp_path):
    from ctrkit.train.run import evaluate, train
    train(_cfg(raw, tmp_path, "run", "train.device=cpu", "train.max_steps=2"))
    with pytest.raises(CtrkitError, match=r"does not match model 'deepfm' \(Missing key\(s\)"):
        evaluate(_cfg(raw, tmp_path, "run", "train.device=cpu", "model.hidden_units=[32,8]"))


def test_fused_tables_checkpoint_per_table():
    """Fused (fbgemm TBE) tables save per table, not in fbgemm's placement-specific buffers
    (weights_host on the CPU, weights_dev on a GPU), so a checkpoint loads on either device."""
    from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
    from ctrkit.models.fused import FusedEmbeddingBags

    def make():
        bag = BatchedEmbeddingBags([table_config("t0", "f0", 10, 4), table_config("t1", "f1", 7, 4)])
        return FusedEmbeddingBags(bag, "rowwise_adagrad", lr=1e-3)
    a, b = make(), make()
    state = {k: v + 1 for k, v in a.state_dict().items()}
    assert sorted(state) == ["optimizer.t0.0", "optimizer.t1.0", "weight.t0", "weight.t1"]
    b.load_state_dict(state)
    assert torch.equal(b.tbe.split_embedding_weights()[1], state["weight.t1"])
    assert torch.equal(b.tbe.split_optimizer_states()[0][0], state["optimizer.t0.0"])
