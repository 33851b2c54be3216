"""Checkpoints: model, optimizer and scheduler state, data position and RNG, written atomically.

A single process keeps `checkpoints/last.pt`. The ranks of a distributed run keep one file each per
checkpoint step (`last-step<k>-rank<r>.pt`); a step counts only once every rank has written it:
write, barrier, then rank 0 renames the marker `last.json` onto `{"step": k}`, barrier, and each
rank drops its older files. A rank that dies mid-way leaves the marker at the previous step, which
every rank still has, so a restart or resume loads one step on every rank.
"""
from __future__ import annotations

import json
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from ctrkit.errors import CtrkitError
from ctrkit.ownership import atomic_path, atomic_write_text, write_error

LAST = "last.pt"
MARKER = "last.json"
RANK_PATTERN = "last-step*-rank*.pt"


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
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint;
    a failed write (disk full) removes its temporary file and is one line."""
    try:
        with atomic_path(Path(path)) as tmp:
            torch.save(state, tmp)
    except OSError as e:
        raise write_error(Path(path), e) from None
    except RuntimeError as e:   # torch's stream writer: "... failed writing file ..."
        if "writ" not in str(e).lower():
            raise
        raise CtrkitError(f"{path}: cannot write checkpoint ({str(e).splitlines()[0][:200]})") \
            from None


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint file as saved by `save_checkpoint`; anything else is a one-line error."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CtrkitError(f"{path}: checkpoint not found") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError, ImportError, IndexError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtrkitError(f"{path}: not a readable ctrkit checkpoint (truncated or another kind "
                          f"of file: {first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CtrkitError(f"{path}: not a ctrkit checkpoint (no model weights in it)")
    return state


# ---------------------------------------------------------------- one step on every rank

def rank_file(folder: Path, step: int, rank: int) -> Path:
    return Path(folder) / f"last-step{step:08d}-rank{rank}.pt"


def read_marker(folder: Path) -> Optional[Dict[str, int]]:
    """{"step": the newest step every rank has written, "world": their number}, or None."""
    path = Path(folder) / MARKER
    try:
        d = json.loads(path.read_text())
        return {"step": int(d["step"]), "world": int(d["world"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CtrkitError(f"{path}: unreadable checkpoint marker ({e})") from None


def marked_step(folder: Path) -> Optional[int]:
    m = read_marker(folder)
    return None if m is None else m["step"]


def last_rank_checkpoint(folder: Path, rank: int) -> Optional[Path]:
    """This rank's file of the marked step (None when there is no marker)."""
    step = marked_step(folder)
    return None if step is None else rank_file(folder, step, rank)


def save_on_every_rank(folder: Path, state: Dict[str, Any], rank: int, world: int,
                       barrier: Callable[[], None],
                       fault: Callable[[str], None] = lambda where: None) -> Path:
    """The protocol above. `barrier` waits for every rank; `fault` is a test hook."""
    step = int(state["step"])
    path = rank_file(folder, step, rank)
    fault("save")
    save_checkpoint(path, state)
    fault("saved")
    barrier()
    if rank == 0:
        atomic_write_text(Path(folder) / MARKER, json.dumps({"step": step, "world": world}))
    barrier()
    for old in Path(folder).glob(f"last-step*-rank{rank}.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return path
