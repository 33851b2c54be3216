"""Checkpoints: model, optimizer and scheduler state, data position and RNG, written atomically."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():   # dropout on the GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any], cuda: bool = False) -> None:
    """Restore the generators; the GPU's only for a run on the GPU (`cuda`), so that a CPU run
    resumed from a GPU checkpoint never opens a CUDA context."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if cuda and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
