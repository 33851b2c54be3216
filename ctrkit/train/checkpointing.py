"""The checkpoint manager: every checkpoint a run writes or reads, and the rule for when to save.

Formats (files in `run_dir/checkpoints/`):
- `last.pt` (one process) or `last-step<k>-rank<r>.pt` + `last.json` (every rank of a multi-rank
  run; a step counts once all ranks wrote it, ctrkit/train/checkpoint.py): the resumable state;
- `best.pt`: the weights kept (validated best; the weight average when there is one);
- `best/`: a sharded run's kept weights as a torch.distributed.checkpoint, written by shard
  group 0, which loads with any shard group size or into one process.

When `last` is saved (`due`): every `train.checkpoint_every` steps, or with checkpoint_every = 0
after each evaluation; and whenever the loop stops (an epoch's end, max_steps, early stopping, a
signal), unless this step was saved already.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from torch import nn

from ctrkit.distributed.runtime import DistEnv, gather_floats
from ctrkit.distributed.sharding import load_model, save_model
from ctrkit.errors import CtrkitError, Interrupted
from ctrkit.ownership import OwnedFolder
from ctrkit.train.checkpoint import (LAST, MARKER, last_rank_checkpoint, load_checkpoint,
                                     marked_step, save_checkpoint, save_on_every_rank)
from ctrkit.train.ema import load_averaged_weights
from ctrkit.train.run_dir import CHECKPOINTS, RUN, SHARDED_BEST_TREES

BEST = "best.pt"
BEST_SHARDED = "best"   # torch.distributed.checkpoint folder of a sharded run's best model


def mismatch(e: Exception, limit: int = 300) -> str:
    """The useful line of load_state_dict's error (its first line only says that there are errors):
    which keys are missing or unexpected, or which sizes differ."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else \
        (lines[0] if lines else type(e).__name__)
    return detail if len(detail) <= limit else detail[:limit] + " ..."


class CheckpointManager:
    """One rank's checkpoints. `grid` is the strategy's ShardGrid when the tables are sharded;
    `fault(step, where)` is a test hook called around a rank's save."""

    def __init__(self, run_dir: Path, env: DistEnv, every: int, grid=None,
                 fault: Callable[[int, str], None] = lambda step, where: None) -> None:
        self.run_dir, self.folder, self.env = run_dir, run_dir / CHECKPOINTS, env
        self.every, self.grid, self.fault = every, grid, fault
        self.saved_step: Optional[int] = None

    # ------------------------------------------------------------------ last: the resumable state
    def due(self, step: int, event: str) -> bool:
        """Whether `last` is saved at `step` after `event`: "step" (one was taken), "eval" (an
        evaluation ran) or "stop" (the loop stops: epoch end, max_steps, early stop, a signal)."""
        if event == "step":
            return bool(self.every) and step % self.every == 0
        if event == "eval":
            return not self.every
        return self.saved_step != step

    def last_path(self) -> Optional[Path]:
        """The resumable state to load: last.pt, or this rank's file of the newest step that every
        rank has written (None: there is none)."""
        return last_rank_checkpoint(self.folder, self.env.rank) if self.env.active else \
            self.folder / LAST

    def save(self, step: int, state: dict) -> None:
        if not self.env.active:
            save_checkpoint(self.folder / LAST, state)
        else:
            save_on_every_rank(self.folder, state, self.env.rank, self.env.world, dist.barrier,
                               fault=lambda where: self.fault(step, where))
        self.saved_step = step

    def resume_from(self, requested: bool) -> Optional[Path]:
        """The checkpoint to resume from, or None to start fresh: `train.resume`, or after a
        torchrun restart (distributed.max_restarts) when every rank has one, so that every rank
        continues from the newest step all ranks have."""
        last = self.last_path()
        have = last is not None and last.is_file()
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if not (requested or (restarted and min(gather_floats(float(have), self.env)) == 1.0)):
            return None
        if not have:
            raise CtrkitError(f"{self.run_dir}: rank {self.env.rank} has no checkpoint to resume "
                              f"from ({last or CHECKPOINTS + '/last.json'} is missing)")
        return last

    def load(self, path: Path) -> dict:
        """A resumable state (what `resume_from` found)."""
        return load_checkpoint(path)

    # ------------------------------------------------------------------ best: the weights kept
    def save_best(self, model: nn.Module, state: dict, step: int) -> None:
        if self.grid is not None:
            self._save_sharded_best(model, state)
        elif self.env.is_main:
            save_checkpoint(self.folder / BEST, {"model": state, "step": step})

    def _save_sharded_best(self, model: nn.Module, state: dict) -> None:
        """Shard group 0 writes `state` as a torch.distributed.checkpoint; the folder is swapped in
        whole, so a crash leaves the old or the new one."""
        grid = self.grid
        if grid.group != 0:
            return
        mine = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        path = self.folder / BEST_SHARDED
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        if grid.pos == 0:   # one rank clears leftovers; nobody writes before they are gone
            OwnedFolder(self.run_dir, RUN).record(trees=SHARDED_BEST_TREES)   # (rank 0 only)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier(group=grid.shard_pg)
        save_model(model, tmp, group=grid.shard_pg)
        dist.barrier(group=grid.shard_pg)
        if grid.pos == 0:
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        model.load_state_dict(mine)

    def load_best(self, model: nn.Module) -> bool:
        """Load the kept weights into `model`; False when the run kept none (no validation)."""
        best, sharded = self.folder / BEST, self.folder / BEST_SHARDED
        if self.grid is not None and sharded.is_dir():
            load_model(model, sharded, group=self.grid.shard_pg)
        elif self.grid is None and best.is_file():
            model.load_state_dict(load_checkpoint(best)["model"])
        else:
            return False
        return True

    # ------------------------------------------------------------------ weights from elsewhere
    def init_weights(self, model: nn.Module, path: Path, model_name: str) -> None:
        """`train.init_from`: a DCP folder loads into any layout; a `.pt` file into unsharded
        tables only (its flat per-dimension weights do not split into shards)."""
        if (path / ".metadata").is_file():
            load_model(model, path, group=self.grid.shard_pg if self.grid else None)
            return
        if not path.is_file():
            raise CtrkitError(f"train.init_from: {path} is neither a checkpoint file nor a "
                              "torch.distributed.checkpoint folder")
        if self.grid:
            raise CtrkitError(f"train.init_from: {path} is a .pt checkpoint; a sharded run "
                              "starts from a torch.distributed.checkpoint folder (checkpoints/best "
                              "of a sharded run, or `ctrkit.distributed.sharding.save_model`)")
        try:
            load_averaged_weights(model, load_checkpoint(path))
        except (RuntimeError, KeyError, ValueError) as e:
            raise CtrkitError(f"train.init_from: {path} does not match model "
                              f"'{model_name}' ({mismatch(e)})") from None


def checkpoint_to_evaluate(run_dir: Path, checkpoint: Optional[str]) -> Path:
    """`ctrkit eval`'s checkpoint: the one named, else the run's best (best.pt, a sharded run's
    best/), else its last.pt."""
    folder = run_dir / CHECKPOINTS
    path = Path(checkpoint) if checkpoint else folder / BEST
    for fallback in (BEST_SHARDED, LAST):
        if checkpoint is None and not path.exists():
            path = folder / fallback
    if not (path.is_file() or (path / ".metadata").is_file()):
        raise CtrkitError(f"{path}: checkpoint not found")
    return path


def load_for_evaluation(model: nn.Module, path: Path, model_name: str) -> None:
    """A checkpoint's weights into one process's model (a sharded run's loaded whole; a last.pt's
    weight average where it holds one)."""
    try:
        if path.is_dir():
            load_model(model, path)
        else:
            load_averaged_weights(model, load_checkpoint(path))
    except (RuntimeError, ValueError) as e:
        raise CtrkitError(f"{path}: does not match model '{model_name}' ({mismatch(e)})") from None


def interrupted_run(run_dir: Path) -> Interrupted:
    """What a launcher reports when its ranks stopped on a signal: the step every rank saved."""
    folder = run_dir / CHECKPOINTS
    step = marked_step(folder)
    return Interrupted(step, folder / MARKER if step is not None else folder)
