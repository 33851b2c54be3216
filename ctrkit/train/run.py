"""The `train` and `evaluate` entry points: run folder, launching the ranks, one rank's run, and the
evaluation of a saved checkpoint (the loop itself is ctrkit/train/trainer.py)."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch.distributed as dist
from torch import nn

from ctrkit.config import Config, dump_config
from ctrkit.data.loader import BatchLoader
from ctrkit.data.preprocess import open_prepared
from ctrkit.data.schema import Schema
from ctrkit.distributed.prepare import prepare_on_ranks
from ctrkit.distributed.runtime import (DistEnv, init_distributed, is_comm_failure,
                                        launch_workers, launched_by_torchrun, shutdown)
from ctrkit.errors import CtrkitError
from ctrkit.ownership import OwnedFolder, atomic_write_text, is_within
from ctrkit.strategies import check_strategy
from ctrkit.train.checkpointing import (checkpoint_to_evaluate, interrupted_run,
                                        load_for_evaluation)
from ctrkit.distributed.device import resolve_device, use_device
from ctrkit.metrics import evaluate_split
from ctrkit.train.interrupt import StopSignals
from ctrkit.train.logging import NullLogger, RunLogger, plot_curves, read_json, write_json
from ctrkit.train.memory import keep_freed_memory
from ctrkit.train.run_dir import RUN, open_run_dir, resume_conflict, save_scoring_data
from ctrkit.train.setup import build_training_model, set_threads
from ctrkit.train.trainer import Trainer


@dataclass
class RunResult:
    metrics: Dict[str, object]
    run_dir: Path
    model: Optional[nn.Module] = field(default=None, repr=False)


def train(cfg: Config, progress: Optional[bool] = None) -> RunResult:
    """Train the configured model; returns the final metrics (also written to metrics.json).

    With `distributed.workers > 1` this process launches the ranks through torch's elastic
    launcher and returns rank 0's metrics; under torchrun it is one of the ranks.
    """
    if progress is not None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": progress})})
    tc = cfg.train
    check_strategy(cfg)
    if cfg.distributed.workers > 1 and not launched_by_torchrun():
        # The launcher holds the data's shared lock and the run folder's lock for its ranks.
        with open_run_dir(cfg) as run_dir, open_prepared(cfg, tc.progress):
            os.environ["CTRKIT_LAUNCHED"] = "1"
            try:
                launch_workers(cfg, run_dir, interrupted_run)
            finally:
                os.environ.pop("CTRKIT_LAUNCHED", None)
            return RunResult(read_json(run_dir / "metrics.json"), run_dir, None)
    env = init_distributed(cfg)
    set_threads(tc.threads or (1 if env.active else 0))
    keep_freed_memory()
    try:
        result = _train_rank(cfg, env)
        if env.active:   # nobody tears down its process group while a peer may still talk to it
            dist.barrier()
        return result
    except (RuntimeError, dist.DistError) as e:
        if not env.active or not is_comm_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtrkitError(f"rank {env.rank}: {first} (a peer died, or hung longer than "
                          f"distributed.timeout_s={cfg.distributed.timeout_s:g})") from None
    finally:
        shutdown()


def _train_rank(cfg: Config, env: DistEnv) -> RunResult:
    with contextlib.ExitStack() as hold:   # (the folders' locks, held until the run ends)
        launched = os.environ.get("CTRKIT_LAUNCHED")   # (the launcher prepared the data)
        if env.is_main:   # (the run folder first: a resume on other data must not re-prepare)
            run_dir = Path(cfg.train.run_dir) if launched else hold.enter_context(open_run_dir(cfg))
        if env.active and not launched:   # torchrun's ranks prepare a split's files together
            # (data.overwrite is ignored, as open_prepared ignores it: training uses
            # up-to-date data, it does not rebuild it at every start)
            data = cfg.data.model_copy(update={"overwrite": False})
            prepare_on_ranks(cfg.model_copy(update={"data": data}), cfg.train.progress)
        if env.is_main:
            schema = hold.enter_context(open_prepared(cfg, cfg.train.progress))
        if env.active:
            dist.barrier()
        if not env.is_main:
            schema = Schema.load(Path(cfg.data.prepared_dir))
            run_dir = Path(cfg.train.run_dir)
        # ranks under a launcher get each signal twice: only a single process stops on the second
        signals = hold.enter_context(StopSignals(hard_after=2 if not env.active else 10 ** 9))
        return _run(cfg, env, schema, run_dir, signals)


def _run(cfg: Config, env: DistEnv, schema: Schema, run_dir: Path,
         signals: StopSignals) -> RunResult:
    tc = cfg.train
    trainer = Trainer(cfg, schema, run_dir, env)
    resume = trainer.checkpoints.resume_from(tc.resume)
    trainer.strategy.on_start(trainer.model, resumed=resume is not None)
    if resume is not None:
        trainer.load_state_dict(trainer.checkpoints.load(resume), resume)
    logger = NullLogger()
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        save_scoring_data(run_dir, schema)
        logger = RunLogger(run_dir, tensorboard=tc.tensorboard,
                           resume_step=trainer.step if resume is not None else None)
    try:
        trainer.fit(logger, signals)
        metrics = trainer.final_metrics()
        for split in ("valid", "test"):
            if split in metrics:
                m = metrics[split]
                logger.log({"step": trainer.step, "epoch": trainer.epoch, "samples": trainer.samples,
                            "split": f"final_{split}", "auc": m["auc"], "logloss": m["logloss"]})
    finally:
        logger.close()
    if env.is_main:
        write_json(run_dir / "metrics.json", metrics)
        if tc.plot:
            plot_curves(run_dir)
    return RunResult(metrics, run_dir, trainer.model)


def evaluate(cfg: Config, checkpoint: Optional[str] = None,
             progress: Optional[bool] = None) -> dict:
    """Evaluate a checkpoint (default: the run's best, else last) on valid and test."""
    with open_prepared(cfg, cfg.train.progress if progress is None else progress) as schema:
        return _evaluate_checkpoint(cfg, schema, checkpoint)


def _evaluate_checkpoint(cfg: Config, schema: Schema, checkpoint: Optional[str]) -> dict:
    set_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    use_device(device)
    run_dir = Path(cfg.train.run_dir)
    path = checkpoint_to_evaluate(run_dir, checkpoint)
    model = build_training_model(cfg, schema, device)
    load_for_evaluation(model, path, cfg.model.name)
    out: Dict[str, object] = {"checkpoint": str(path), "model": cfg.model.name}
    for split in ("valid", "test"):
        if split in schema.splits:
            out[split] = evaluate_split(model, BatchLoader(schema, split, cfg.train.eval_batch_size,
                                                           prefetch=cfg.train.prefetch,
                                                           pin_memory=device.type == "cuda"))
    _record_eval(_run_of(path, run_dir), cfg, out)
    return out


def _run_of(checkpoint: Path, run_dir: Path) -> Optional[Path]:
    """The run folder a checkpoint belongs to (None: not inside a ctrkit run folder)."""
    if is_within(checkpoint, run_dir):
        return run_dir
    for parent in list(checkpoint.resolve().parents)[:3]:
        if OwnedFolder(parent, RUN).manifest_kind == RUN:
            return parent
    return None


def _record_eval(run: Optional[Path], cfg: Config, out: dict) -> None:
    """Merge an evaluation into its own run's metrics.json (never another run's, and only when
    it was made on the data that run was trained on)."""
    if run is None or not run.is_dir():
        return
    folder = OwnedFolder(run, RUN)
    if not folder.owned:
        return
    other = resume_conflict(run, cfg)
    if other:
        print(f"ctrkit: {run}/metrics.json not updated: this evaluation's {other}",
              file=sys.stderr, flush=True)
        return
    path_json = run / "metrics.json"
    try:
        with folder.lock(exclusive=True, wait=False):
            merged = read_json(path_json) if path_json.is_file() else {}
            merged.update(out)
            write_json(path_json, merged)
    except CtrkitError as e:
        if "in use by" not in str(e):
            raise
        print(f"ctrkit: {run} is being written by a training run; metrics.json not updated",
              file=sys.stderr, flush=True)
