"""Model zoo. Importing this package registers the built-in models."""
import inspect

from ctrkit.errors import ConfigError
from ctrkit.models import zoo  # noqa: F401  (registers lr, fm, deepfm)
from ctrkit.models.registry import available_models, get_model_class, register_model

__all__ = ["register_model", "get_model_class", "available_models", "build_model"]


def build_model(cfg_model, schema):
    """Instantiate the configured model with the schema and the model section's extra keys."""
    cls = get_model_class(cfg_model.name)
    params = dict(cfg_model.model_extra or {})
    sig = inspect.signature(cls.__init__)
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in params if k not in sig.parameters and not accepts_any]
    if unknown:
        allowed = [k for k in sig.parameters if k not in ("self", "schema")]
        raise ConfigError(f"model.{unknown[0]}: unknown key for model '{cfg_model.name}' "
                          f"(accepted: {', '.join(allowed)})")
    try:
        return cls(schema, **params)
    except TypeError as e:
        raise ConfigError(f"model '{cfg_model.name}': {e}") from None
