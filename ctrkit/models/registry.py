"""Model registry: `@register_model("name")` or a `ctrkit.models` entry point, selected by config."""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Dict, Type

from torch import nn

from ctrkit.errors import ConfigError

_MODELS: Dict[str, Type[nn.Module]] = {}


def register_model(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    def deco(cls: Type[nn.Module]) -> Type[nn.Module]:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model '{name}' is already registered by {_MODELS[name].__module__}")
        _MODELS[name] = cls
        return cls
    return deco


def _load_entry_points() -> None:
    for ep in entry_points(group="ctrkit.models"):
        if ep.name not in _MODELS:
            _MODELS[ep.name] = ep.load()


def available_models() -> list:
    _load_entry_points()
    return sorted(_MODELS)


def get_model_class(name: str) -> Type[nn.Module]:
    if name not in _MODELS:
        _load_entry_points()
    if name not in _MODELS:
        raise ConfigError(f"model.name: unknown model '{name}' (known: {', '.join(available_models())})")
    return _MODELS[name]
