"""The run folder: refused when it would hold or sit inside an input, locked while a run writes
it, and `train.overwrite` removes only what ctrkit wrote there (ctrkit/ownership.py)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import yaml

from ctrkit.config import Config
from ctrkit.data.fingerprint import DATA_KEYS
from ctrkit.data.preprocess import SPLITS, split_files
from ctrkit.data.schema import SCHEMA_FILE, Schema
from ctrkit.errors import CtrkitError
from ctrkit.ownership import OwnedFolder, atomic_path, check_disjoint, check_folder
from ctrkit.train.checkpoint import LAST, MARKER, RANK_PATTERN, read_marker

RUN = "run folder"
CHECKPOINTS = "checkpoints"
SCORING_DATA = "data"   # the schema and vocabularies the run was trained with (ctrkit predict)
# Everything a run writes, recorded in the manifest before it is written.
RUN_FILES = ["config.yaml", "launch.yaml", "metrics.csv", "metrics.json", "curves.png",
             f"{CHECKPOINTS}/{LAST}", f"{CHECKPOINTS}/{MARKER}", f"{CHECKPOINTS}/best.pt",
             f"{SCORING_DATA}/{SCHEMA_FILE}"]
RUN_PATTERNS = ["tb/events.out.tfevents.*", f"{CHECKPOINTS}/{RANK_PATTERN}",
                f"{SCORING_DATA}/vocab/*.arrow"]
RUN_DIRS = ["tb", CHECKPOINTS, SCORING_DATA, f"{SCORING_DATA}/vocab"]
# a sharded run's best model (torch.distributed.checkpoint folders), recorded when first saved
SHARDED_BEST_TREES = [f"{CHECKPOINTS}/best", f"{CHECKPOINTS}/best.tmp", f"{CHECKPOINTS}/best.old"]


def has_checkpoint(run_dir: Path) -> bool:
    ck = Path(run_dir) / CHECKPOINTS
    return (ck / LAST).is_file() or (ck / MARKER).is_file()


def _inputs(cfg: Config) -> list:
    paths = []
    for s in SPLITS:
        pattern = getattr(cfg.data, s)
        if pattern:
            with contextlib.suppress(CtrkitError):   # (a missing file is prepare's to report)
                paths += split_files(pattern)
    paths.append(Path(cfg.data.prepared_dir))
    if cfg.train.init_from:
        paths.append(Path(cfg.train.init_from))
    return paths


def resume_conflict(run_dir: Path, cfg: Config) -> Optional[str]:
    """How the data config differs from the one the run was trained with (its config.yaml).
    Resuming on other data would also re-prepare the shared data the checkpoint was fitted to."""
    path = run_dir / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text())["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    new = cfg.data.model_dump(mode="json")
    for k in ("train", "valid", "test") + DATA_KEYS:
        if old.get(k) != new.get(k):
            return f"data.{k} was {old.get(k)!r} in this run, is {new.get(k)!r} now"
    return None


def _check_world(run_dir: Path, workers: int) -> None:
    """A resume needs the number of ranks the resumable state was written by."""
    ck = run_dir / CHECKPOINTS
    marker = read_marker(ck)
    single = (ck / LAST).is_file()
    if workers == 1 and not single and marker:
        have = f"{marker['world']} ranks"
    elif workers > 1 and (not marker or marker["world"] != workers):
        have = f"{marker['world']} ranks" if marker else "a single process"
    else:
        return
    raise CtrkitError(f"train.resume: {run_dir} was checkpointed by {have}, not by "
                      f"distributed.workers={workers}; resume with the same number of workers")


@contextlib.contextmanager
def open_run_dir(cfg: Config) -> Iterator[Path]:
    """The run folder of `cfg`, ready for a fresh run or a resume, exclusively locked in the
    block: a second `train` into it fails at once, naming this process."""
    run_dir = Path(cfg.train.run_dir)
    tc = cfg.train
    check_folder(run_dir, "train.run_dir")
    check_disjoint(run_dir, "train.run_dir", _inputs(cfg))
    folder = OwnedFolder(run_dir, RUN)
    if not folder.owned:   # never put even a lock file into a folder that is not ctrkit's
        folder.check_replaceable("train.overwrite=true")
    with folder.lock(exclusive=True, wait=False):
        if tc.resume:
            if not has_checkpoint(run_dir):
                raise CtrkitError(f"{run_dir}: no checkpoint to resume from ({CHECKPOINTS}/{LAST} "
                                  f"or {CHECKPOINTS}/{MARKER})")
            _check_world(run_dir, cfg.distributed.workers)
            why = resume_conflict(run_dir, cfg)
            if why:
                raise CtrkitError(f"train.resume: {why}; resume with the run's own data config "
                                  f"({run_dir / 'config.yaml'})")
        elif folder.contents():
            if not tc.overwrite:
                raise CtrkitError(f"{run_dir} is not empty; set train.resume=true to continue it "
                                  "or train.overwrite=true to start over")
            folder.check_replaceable("train.overwrite=true")
            folder.clear()
        folder.record(files=RUN_FILES, patterns=RUN_PATTERNS, dirs=RUN_DIRS)
        yield run_dir


def save_scoring_data(run_dir: Path, schema: Schema) -> None:
    """The schema and vocabularies the run is trained with, into `run_dir/data/`: the run folder
    then scores new rows on any machine (ctrkit/serving/predict.py). Vocabularies are hard links
    where the filesystem allows (prepare replaces its files, it never rewrites them), else
    copies; each appears atomically, schema.json last."""
    out = run_dir / SCORING_DATA
    (out / "vocab").mkdir(parents=True, exist_ok=True)
    for f in schema.sparse:
        if f.vocab == "hash":   # (its ids are a hash: no vocabulary file)
            continue
        src, dst = schema.vocab_path(f.name), out / "vocab" / f"{f.name}.arrow"
        with contextlib.suppress(OSError):
            if os.path.samefile(src, dst):
                continue
        with atomic_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
    schema.save(out)
