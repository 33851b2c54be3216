"""`schema.json`: what `prepare` produced — features, vocabulary sizes, shards and row accounting."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ctrkit.errors import CtrkitError
from ctrkit.ownership import atomic_write_text

SCHEMA_FILE = "schema.json"
LAYOUT_VERSION = 2   # 2: row-major shards ([rows, features])
OOV_ID, MISSING_ID = 0, 1   # every categorical vocabulary starts with these two ids


@dataclass
class FeatureInfo:
    name: str
    kind: str               # "sparse" (categorical id) | "dense" (float)
    source: str
    transform: str = "none"
    vocab_size: int = 0     # sparse: ids 0 (out of vocabulary), 1 (missing), 2.. (seen values)
    min_count: int = 1


@dataclass
class SplitInfo:
    files: List[str]
    rows_read: int
    rows_written: int
    rows_skipped: int
    skipped: Dict[str, int]
    shards: List[str] = field(default_factory=list)
    positives: int = 0


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

    @property
    def sparse(self) -> List[FeatureInfo]:
        return [f for f in self.features if f.kind == "sparse"]

    @property
    def dense(self) -> List[FeatureInfo]:
        return [f for f in self.features if f.kind == "dense"]

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
