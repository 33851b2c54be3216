"""What produced a prepared folder: the data config keys that shape the shards and every input
file's size and modification time. `schema.json` keeps it (`source`); `train` compares it with its
own config and re-prepares (or refuses) when they differ, instead of training on stale shards."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ctrkit.config import DataConfig
from ctrkit.version import __version__

# data.* keys whose value changes what prepare writes (read_block_mb etc. only change its speed)
DATA_KEYS = ("format", "header", "delimiter", "label", "min_count", "valid_fraction", "test_fraction", "vocab", "max_size", "hash_buckets", "dense_transform", "features",
         "skip_bad_rows", "shard_rows")


def _file(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(dc: DataConfig, files: Dict[str, List[Path]]) -> dict:
    d = dc.model_dump(mode="json")
    return {"ctrkit": __version__, "data": {k: d[k] for k in DATA_KEYS},
            "inputs": {split: [_file(p) for p in fs] for split, fs in files.items()}}


def first_difference(old: Optional[dict], new: dict) -> Optional[str]:
    """The first way the prepared folder's fingerprint `old` differs from `new`, in words (None:
    they agree)."""
    if not old:
        return "it records no fingerprint (prepared by an older ctrkit)"
    if old.get("ctrkit") != new["ctrkit"]:
        return f"it was prepared by ctrkit {old.get('ctrkit')}, this is {new['ctrkit']}"
    for k in DATA_KEYS:
        a, b = old.get("data", {}).get(k), new["data"][k]
        if a != b:
            return f"data.{k} was {_short(a)} there, is {_short(b)} now"
    oi, ni = old.get("inputs", {}), new["inputs"]
    for split in ("train", "valid", "test"):
        a, b = oi.get(split, []), ni.get(split, [])
        pa, pb = [f["path"] for f in a], [f["path"] for f in b]
        if pa != pb:
            return f"data.{split} was {_short(pa or None)} there, is {_short(pb or None)} now"
        for fa, fb in zip(a, b):
            if (fa["size"], fa["mtime_ns"]) != (fb["size"], fb["mtime_ns"]):
                return f"input {fb['path']} changed since (size or modification time)"
    return None


def _short(v, limit: int = 120) -> str:
    s = repr(v[0] if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) else v)
    return s if len(s) <= limit else s[:limit] + "...'"
