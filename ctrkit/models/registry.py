"""Model registry: `@register_model("name")` or a `ctrkit.models` entry point, selected by config."""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Type, get_type_hints

from pydantic import BaseModel, ConfigDict, create_model
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


def constructor_arguments(name: str) -> Type[BaseModel]:
    """A pydantic model of the keyword arguments model `name`'s constructor takes after the schema
    (its first parameter), read from its signature: values must fit the annotations, constraints
    such as `Annotated[int, Field(ge=1)]` included; a parameter without a default is required; a
    key that is no parameter is an error unless the constructor takes **kwargs. The config checks
    the `model:` section with it."""
    cls = get_model_class(name)
    try:
        hints = get_type_hints(cls.__init__, include_extras=True)
    except Exception:   # an annotation that does not resolve at run time: check no types
        hints = {}
    params = list(inspect.signature(cls).parameters.values())[1:]
    fields: Dict[str, Any] = {
        p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default)
        for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    extra = "allow" if any(p.kind == p.VAR_KEYWORD for p in params) else "forbid"
    config = ConfigDict(extra=extra, allow_inf_nan=False, arbitrary_types_allowed=True,
                        protected_namespaces=())
    return create_model(f"{cls.__name__}Arguments", __config__=config, **fields)
