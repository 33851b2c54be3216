"""Run logging: metrics.csv (one row per event, easy to plot), TensorBoard scalars, curves PNG."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from ctrkit.errors import CtrkitError
from ctrkit.ownership import atomic_path, atomic_write_text

FIELDS = ["step", "epoch", "samples", "split", "loss", "auc", "logloss", "lr", "samples_per_s",
          "wall_s", "auc_spread", "auc_min", "consensus_embedding", "consensus_dense",
          "bytes_per_worker_step"]


class RunLogger:
    """`resume_step`: continue the run's metrics.csv, dropping rows logged after that step (they
    are logged again by the resumed run); otherwise start a new file."""

    def __init__(self, run_dir: Path, tensorboard: bool = True,
                 resume_step: Optional[int] = None) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.csv"
        kept = _rows_until(self.path, resume_step) if resume_step is not None else []
        with atomic_path(self.path) as tmp:   # (the header is on disk before any row)
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(kept)
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=FIELDS)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, row: Dict[str, object]) -> None:
        self._w.writerow({k: row.get(k, "") for k in FIELDS})
        self._f.flush()
        if self._tb is not None:
            split, step = row.get("split", "train"), int(row["step"])
            for k in FIELDS[4:]:
                v = row.get(k)
                if isinstance(v, (int, float)) and not math.isnan(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


class NullLogger:
    """What ranks other than 0 log to: nothing."""

    def log(self, row: Dict[str, object]) -> None:
        pass

    def close(self) -> None:
        pass


def _rows_until(path: Path, step: int) -> List[Dict[str, str]]:
    """The rows of an earlier metrics.csv up to `step` (a file without its header, as an older
    ctrkit could leave after a kill, is read with the known columns)."""
    try:
        with open(path, newline="") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    if lines and lines[0].split(",") == FIELDS:
        lines = lines[1:]
    rows = csv.DictReader(lines, fieldnames=FIELDS)
    return [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]


def read_metrics(run_dir: Path) -> List[Dict[str, str]]:
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Training loss and validation AUC/logloss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = out or Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    series = [("train", "loss", "training loss"), ("valid", "auc", "validation AUC"),
              ("valid", "logloss", "validation logloss")]
    for ax, (split, key, title) in zip(axes, series):
        pts = [(int(r["step"]), float(r[key])) for r in rows if r["split"] == split and r[key]]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if split != "train" else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=float))


def read_json(path: Path) -> dict:
    """A JSON object ctrkit wrote; anything else is a one-line error naming the file."""
    try:
        d = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CtrkitError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise CtrkitError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CtrkitError(f"{path}: not a JSON object")
    return d
