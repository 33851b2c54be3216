"""Where tensors handed to torch.distributed must live."""
from __future__ import annotations

import torch
import torch.distributed as dist


def comm_device() -> torch.device:
    """The current GPU under NCCL, else the host (gloo sends host memory; GPU tensors of ranks
    sharing a GPU are staged through it)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
