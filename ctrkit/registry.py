"""Named registries for what a config selects by name: models, distribution strategies, the parts
of a compressor spec, raw data formats.

A `Registry` maps names to objects. Built-in entries are declared as `"module:attribute"` strings
and imported on first use, so the config, the bottom layer, can validate a name
(`registry.names()`) without importing the layers that implement it. Anything else registers
itself with the decorator (`@STRATEGIES.register("name")`) when its module is imported, e.g. a
plug-in or a test file; a registry with an entry-point group also finds installed packages' entries
(`[project.entry-points."ctrkit.models"]`).
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Tuple


class Registry:
    def __init__(self, kind: str, builtins: Dict[str, str],
                 entry_point_group: Optional[str] = None) -> None:
        self.kind = kind
        self._lazy = dict(builtins)       # name -> "module:attribute", imported on first use
        self.group = entry_point_group    # installed packages' entry points, looked up on a miss
        self.entries: Dict[str, Any] = {}  # name -> the registered (or loaded) object

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            old = self.entries.get(name)
            if old is not None and old is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered by "
                                 f"{getattr(old, '__module__', old)}")
            self.entries[name] = obj
            return obj
        return deco

    def unregister(self, name: str) -> None:
        """Remove a name registered with the decorator (tests; built-ins stay)."""
        self.entries.pop(name, None)

    def _entry_points(self) -> Dict[str, Any]:
        """Entry points of installed packages not registered yet (looked up each time: a package
        may be installed while the process runs)."""
        if not self.group:
            return {}
        return {ep.name: ep for ep in entry_points(group=self.group)
                if ep.name not in self._lazy and ep.name not in self.entries}

    def names(self) -> List[str]:
        """Built-ins in their declared order, then the others in the order they registered, then
        entry points."""
        return list(dict.fromkeys([*self._lazy, *self.entries, *self._entry_points()]))

    def __contains__(self, name: object) -> bool:
        return name in self._lazy or name in self.entries or name in self._entry_points()

    def check(self, name: str, noun: str) -> str:
        """`name` when it is registered; else a ValueError naming the known ones (a config
        validator's message: "unknown <noun> 'x' (known: ...)")."""
        if name not in self:
            raise ValueError(f"unknown {noun} {name!r} (known: {', '.join(self.names())})")
        return name

    def get(self, name: str) -> Any:
        if name not in self.entries and name in self._lazy:
            module, attr = self._lazy[name].split(":")
            self.entries[name] = getattr(importlib.import_module(module), attr)
        if name not in self.entries:
            ep = self._entry_points().get(name)
            if ep is None:
                raise KeyError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())})")
            self.entries[name] = ep.load()
        return self.entries[name]


def compressor_parts(spec: str) -> Tuple[Optional[Any], Optional[Any]]:
    """(selector or None, value coder or None) of a compressor spec: one registered selector
    optionally followed by one value coder, joined by '+', or one of them alone; a part is
    `name[:arg]` and its factory `(spec, name, arg)` builds it. Raises a one-line ValueError naming
    `spec` (a config validator's message). ctrkit.comm.compress.build_compressor makes the
    compressor from the parts."""
    known = ", ".join(SELECTORS.names() + CODERS.names())
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compressor {spec!r}: empty spec (known: {known})")
    parts = []
    for part in spec.strip().split("+"):
        name, _, arg = part.strip().partition(":")
        name = name.strip().lower()
        registry = SELECTORS if name in SELECTORS else CODERS if name in CODERS else None
        if registry is None:
            raise ValueError(f"compressor {spec!r}: unknown name {name!r} (known: {known})")
        parts.append((registry, name, registry.get(name)(spec, name, arg)))
    selector = parts[0][2] if parts[0][0] is SELECTORS else None
    rest = parts[1:] if selector is not None else parts
    if len(rest) > 1 or any(r is SELECTORS for r, _, _ in rest) or \
            (rest and len(parts) > 1 and rest[0][1] == "identity"):
        raise ValueError(f"compressor {spec!r}: expected one selector "
                         f"({', '.join(SELECTORS.names())}) optionally followed by one value coder "
                         f"({', '.join(CODERS.names())}), joined by '+'; or one of them alone")
    return selector, (rest[0][2] if rest else None)


# model.name -> an nn.Module class (ctrkit/models/zoo.py, or a package's "ctrkit.models" entry point)
MODELS = Registry("model", {
    "lr": "ctrkit.models.zoo:LogisticRegression",
    "fm": "ctrkit.models.zoo:FM",
    "deepfm": "ctrkit.models.zoo:DeepFM",
}, entry_point_group="ctrkit.models")


# distributed.algorithm -> a ctrkit.strategies.Strategy class (ctrkit/strategies/)
STRATEGIES = Registry("distributed.algorithm", {
    "local": "ctrkit.strategies.local:LocalStrategy",
    "allreduce": "ctrkit.strategies.allreduce:AllreduceStrategy",
    "dpsgd": "ctrkit.strategies.gossip:Dpsgd",
    "damsgrad": "ctrkit.strategies.gossip:Damsgrad",
    "choco": "ctrkit.strategies.gossip:Choco",
})

# data.format -> a ctrkit.data.formats.Format (how a raw file's columns become features)
FORMATS = Registry("data.format", {
    "criteo_tsv": "ctrkit.data.formats:CRITEO_TSV",
    "criteo_csv": "ctrkit.data.formats:CRITEO_CSV",
    "avazu_csv": "ctrkit.data.formats:AVAZU_CSV",
    "csv": "ctrkit.data.formats:GENERIC_CSV",
    "parquet": "ctrkit.data.formats:PARQUET",
})

# The parts of distributed.compressor / dense_compressor specs: factories
# `(spec, name, arg) -> Selector | Coder` (ctrkit/comm/compress.py; `arg` is the text after the
# name's ':', a bad one raises ValueError naming `spec`). A plug-in registers its own with the
# decorator before the config loads (docs/compression.md).
SELECTORS = Registry("compressor selector", {
    "topk": "ctrkit.comm.compress:ratio_selector",
    "randk": "ctrkit.comm.compress:ratio_selector",
})
CODERS = Registry("compressor value coder", {
    "identity": "ctrkit.comm.compress:cast_coder",
    "fp16": "ctrkit.comm.compress:cast_coder",
    "bf16": "ctrkit.comm.compress:cast_coder",
    "int8": "ctrkit.comm.compress:block_coder",
    "int4": "ctrkit.comm.compress:block_coder",
    "sign": "ctrkit.comm.compress:block_coder",
})
