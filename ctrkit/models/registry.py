"""Models by name: `@register_model("name")` or a package's `ctrkit.models` entry point, selected
by `model.name` (the registry itself is ctrkit.registry.MODELS, which the config checks)."""
from __future__ import annotations

from typing import Callable, List, Type

from pydantic import BaseModel
from torch import nn

import ctrkit.config as config
from ctrkit.errors import ConfigError
from ctrkit.registry import MODELS


def register_model(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    return MODELS.register(name)


def available_models() -> List[str]:
    return sorted(MODELS.names())


def get_model_class(name: str) -> Type[nn.Module]:
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model '{name}' (known: {', '.join(available_models())})")
    return MODELS.get(name)


def constructor_arguments(name: str) -> Type[BaseModel]:
    """The pydantic model of model `name`'s constructor keys (ctrkit.config.constructor_arguments)."""
    return config.constructor_arguments(get_model_class(name))
