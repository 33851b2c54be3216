"""Named registries for what a config selects by name: distribution strategies, raw data formats.

A `Registry` maps names to objects. Built-in entries are declared as `"module:attribute"` strings
and imported on first use, so the config, the bottom layer, can validate a name
(`registry.names()`) without importing the layers that implement it. Anything else registers
itself with the decorator (`@STRATEGIES.register("name")`) when its module is imported, e.g. a
plug-in or a test file.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List


class Registry:
    def __init__(self, kind: str, builtins: Dict[str, str]) -> None:
        self.kind = kind
        self._lazy = dict(builtins)          # name -> "module:attribute", imported on first use
        self._entries: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            old = self._entries.get(name)
            if old is not None and old is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered by "
                                 f"{getattr(old, '__module__', old)}")
            self._entries[name] = obj
            return obj
        return deco

    def unregister(self, name: str) -> None:
        """Remove a name registered with the decorator (tests; built-ins stay)."""
        self._entries.pop(name, None)

    def names(self) -> List[str]:
        """Built-ins in their declared order, then the others in the order they registered."""
        return list(dict.fromkeys([*self._lazy, *self._entries]))

    def __contains__(self, name: object) -> bool:
        return name in self._lazy or name in self._entries

    def check(self, name: str, noun: str) -> str:
        """`name` when it is registered; else a ValueError naming the known ones (a config
        validator's message: "unknown <noun> 'x' (known: ...)")."""
        if name not in self:
            raise ValueError(f"unknown {noun} {name!r} (known: {', '.join(self.names())})")
        return name

    def get(self, name: str) -> Any:
        if name not in self._entries and name in self._lazy:
            module, attr = self._lazy[name].split(":")
            self._entries[name] = getattr(importlib.import_module(module), attr)
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} '{name}' (known: {', '.join(self.names())})")
        return self._entries[name]


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
