"""`schema.json`: what `prepare` produced — features, vocabulary sizes, shards and row accounting."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ctrkit.errors import CtrkitError
from ctrkit.ownership import atomic_write_text

SCHEMA_FILE = "schema.json"
LAYOUT_VERSION = 2   # 2: row-major shards ([rows, features])
OOV_ID, MISSING_ID = 0, 1   # every categorical vocabulary starts with these two ids


def _complete_npy(path: Path) -> bool:
    """Whether a .npy file holds as many bytes as its header promises."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
            return path.stat().st_size >= f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (OSError, ValueError):
        return False


@dataclass
class FeatureInfo:
    name: str
    kind: str               # "sparse" (categorical id) | "dense" (float)
    source: str
    transform: str = "none"
    vocab_size: int = 0     # sparse: ids 0 (out of vocabulary), 1 (missing), 2.. (seen values)
    min_count: int = 1
    vocab: str = "count"    # count: vocab/<name>.arrow; hash: 2 + fnv1a64(value) % hash_buckets
    hash_buckets: int = 0
    max_size: Optional[int] = None
    multi: bool = False     # a multi-hot field (values joined by separator): a bag of ids per row
    separator: Optional[str] = None
    max_len: Optional[int] = None
    pooling: str = "sum"


@dataclass
class SplitInfo:
    files: List[str]
    rows_read: int
    rows_written: int
    rows_skipped: int
    skipped: Dict[str, int]
    shards: List[str] = field(default_factory=list)
    positives: int = 0
    # the training split's rows held out as valid/test (data.valid_fraction / test_fraction):
    # rows read = written + skipped + held out; a held-out split names the split it came from
    held_out: Dict[str, int] = field(default_factory=dict)
    from_split: Optional[str] = None


@dataclass
class Schema:
    format: str
    label: str
    features: List[FeatureInfo]
    splits: Dict[str, SplitInfo]
    seconds: float = 0.0
    version: int = LAYOUT_VERSION
    source: Optional[dict] = None   # what produced it: data/fingerprint.py
    root: Optional[Path] = None

    def vocab_path(self, name: str) -> Path:
        """Feature `name`'s vocabulary file (value, count; id i + 2 is row i)."""
        return Path(self.root) / "vocab" / f"{name}.arrow"

    @property
    def sparse(self) -> List[FeatureInfo]:
        return [f for f in self.features if f.kind == "sparse"]

    @property
    def dense(self) -> List[FeatureInfo]:
        return [f for f in self.features if f.kind == "dense"]

    def damaged(self) -> Optional[str]:
        """What is missing or cut short among the files schema.json names (None: all there)."""
        root = Path(self.root)
        names = [f"vocab/{f.name}.arrow" for f in self.sparse if f.vocab == "count"]
        names += [f"{s}/{n}.npy" for split in self.splits.values() for s in split.shards
                  for n in ("sparse", "dense", "label")]
        names += [f"{s}/{f.name}.{n}.npy" for split in self.splits.values() for s in split.shards
                  for f in self.sparse if f.multi for n in ("ids", "offsets")]
        for name in names:
            path = root / name
            if not path.is_file():
                return f"{name} is missing"
            if path.suffix == ".npy" and not _complete_npy(path):
                return f"{name} is cut short"
        return None

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("root")
        return json.dumps(d, indent=1)

    def save(self, folder: Path) -> None:
        atomic_write_text(folder / SCHEMA_FILE, self.to_json())

    @classmethod
    def load(cls, folder: Path) -> "Schema":
        path = Path(folder) / SCHEMA_FILE
        if not path.is_file():
            raise CtrkitError(f"{path}: not found; run `ctrkit prepare` first")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CtrkitError(f"{path}: unreadable ({e})") from None
        if not isinstance(d, dict):
            raise CtrkitError(f"{path}: not a ctrkit schema")
        if d.get("version", 1) != LAYOUT_VERSION:
            raise CtrkitError(f"{path}: written by another ctrkit version (shard layout "
                              f"{d.get('version', 1)}, need {LAYOUT_VERSION}); run prepare again "
                              "with data.overwrite=true")
        return cls(format=d["format"], label=d["label"],
                   features=[FeatureInfo(**f) for f in d["features"]],
                   splits={k: SplitInfo(**v) for k, v in d["splits"].items()},
                   seconds=d.get("seconds", 0.0), version=d["version"], source=d.get("source"),
                   root=Path(folder))
