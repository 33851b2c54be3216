"""Where a rank computes (`train.device`) and which torch.distributed backend goes with it.

One rule for both, so they never disagree: a rank that owns a GPU computes on it and talks NCCL;
a CPU rank talks gloo. Several ranks may share one named GPU (`cuda:N`, handy for testing on a
one-GPU box); NCCL refuses two ranks on one GPU, so those ranks talk gloo, which sends host copies
(see `ctrkit.distributed.runtime.comm_device`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ctrkit.errors import CtrkitError


def _local_rank() -> Optional[int]:
    v = os.environ.get("LOCAL_RANK")
    return int(v) if v is not None and "WORLD_SIZE" in os.environ else None


def resolve_device(setting: str) -> torch.device:
    """The device of this process for `train.device` (auto, cpu, cuda or cuda:N).

    Under torchrun, `auto` and `cuda` give rank r of a node the GPU numbered by its local rank;
    `auto` falls back to the CPU when the node has fewer GPUs than ranks."""
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if _local_rank() is not None else 1
    if setting == "auto" and per_node > torch.cuda.device_count():
        # not a GPU for every rank of this node: all of them compute on the CPU (the same answer
        # on every rank, so they agree on the backend too)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CtrkitError(f"train.device={setting}: torch sees no GPU (torch {torch.__version__}, "
                          f"CUDA build {torch.version.cuda}); use train.device=cpu or auto")
    count = torch.cuda.device_count()
    if setting.startswith("cuda:"):
        index = int(setting.split(":", 1)[1])
        if index >= count:
            raise CtrkitError(f"train.device={setting}: this machine has {count} GPU(s) "
                              f"(cuda:0 .. cuda:{count - 1})")
        return torch.device("cuda", index)
    local = _local_rank()
    index = local if local is not None else torch.cuda.current_device()
    if index >= count:
        raise CtrkitError(f"local rank {local} has no GPU of its own: this node has {count}. Start "
                          f"at most {count} ranks per node, or set train.device=cpu (or cuda:N to "
                          "share one GPU over gloo)")
    return torch.device("cuda", index)


def resolve_backend(backend: str, device: torch.device, setting: str) -> str:
    """`distributed.backend` for this device: auto is NCCL for ranks with a GPU each, else gloo."""
    shared_gpu = setting.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1
    if backend == "auto":
        return "nccl" if device.type == "cuda" and not shared_gpu else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise CtrkitError("distributed.backend=nccl needs train.device=cuda (or auto on a GPU "
                          "machine); CPU ranks use gloo")
    if backend == "nccl" and shared_gpu:
        raise CtrkitError(f"distributed.backend=nccl with train.device={setting}: NCCL needs one "
                          "GPU per rank; use train.device=cuda, or backend gloo to share the GPU")
    return backend


def use_device(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (NCCL and new CUDA tensors use it)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
