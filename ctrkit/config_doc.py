"""The config reference, docs/config.md, rendered from the pydantic schema in ctrkit/config.py.

    python -m ctrkit.config_doc > docs/config.md

Every key of `Config` becomes one table row: dotted path, type, default, allowed values or
bounds (from the annotation and its `Field` constraints) and its meaning (the field's
`description`). A section's docstring introduces it. The `model` section's keys belong to the
chosen model; the built-in models' keys are read from their constructors' signatures
(`ctrkit.config.constructor_arguments`), the way the config checks them.
tests/test_config_doc.py fails when docs/config.md is not what `render()` gives, and when a
field has no description.
"""
from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Mapping as AbcMapping, Sequence as AbcSequence
from typing import Any, Iterator, List, Literal, Optional, Tuple, Type, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

import ctrkit.models  # noqa: F401  (registers the built-in models)
from ctrkit.config import Config
from ctrkit.models.registry import available_models, constructor_arguments, get_model_class

COMMAND = "python -m ctrkit.config_doc > docs/config.md"
_NONE = type(None)


# ---------------------------------------------------------------- walking the schema

def sections(model: Type[BaseModel] = Config,
             prefix: str = "") -> Iterator[Tuple[str, Type[BaseModel]]]:
    """(dotted path, section class) of `model` and every section under it, in schema order; a
    list of sections (data.features) is `path[]`."""
    yield prefix, model
    for name, field in model.model_fields.items():
        sub, is_list = _section_of(field.annotation)
        if sub is not None:
            yield from sections(sub, f"{prefix}{name}{'[]' if is_list else ''}.")


def all_fields(model: Type[BaseModel] = Config,
               prefix: str = "") -> Iterator[Tuple[str, FieldInfo]]:
    """(dotted path, field) of every key, sections included."""
    for path, section in sections(model, prefix):
        for name, field in section.model_fields.items():
            yield path + name, field


def undocumented(model: Type[BaseModel] = Config) -> List[str]:
    """Dotted paths of the keys under `model` that have no description."""
    return [path for path, field in all_fields(model) if not (field.description or "").strip()]


def _strip_optional(tp: Any) -> Tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not _NONE]
        if len(args) < len(get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def _unannotated(tp: Any) -> Tuple[Any, list]:
    """(the type inside Annotated[...], its constraints)."""
    meta: list = []
    while get_origin(tp) is typing.Annotated:
        args = get_args(tp)
        tp = args[0]
        for m in args[1:]:
            meta.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return tp, meta


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_list(tp: Any) -> bool:
    tp, _ = _strip_optional(tp)
    return get_origin(tp) in (list, List, AbcSequence)


def _section_of(tp: Any) -> Tuple[Optional[Type[BaseModel]], bool]:
    """(section class, whether a list of them) of an annotation, or (None, False)."""
    tp, _ = _strip_optional(tp)
    tp, _ = _unannotated(tp)
    if _is_section(tp):
        return tp, False
    if get_origin(tp) in (list, List, AbcSequence):
        inner = _unannotated(get_args(tp)[0])[0]
        if _is_section(inner):
            return inner, True
    return None, False


# ---------------------------------------------------------------- rendering one key

def _number(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int) and v >= 2 ** 16 and v & (v - 1) == 0:
        return f"2^{v.bit_length() - 1}"
    return repr(v) if isinstance(v, float) else str(v)


def _bounds(meta: list, unit: str) -> List[str]:
    """Constraints as words: '[0, 1)', '>= 1', 'exactly 2 entries', 'matches `re`'."""
    out: List[str] = []
    low = high = None   # (bracket, value)
    lo = hi = None
    for m in meta:
        if isinstance(m, at.Ge):
            low = ("[", m.ge)
        elif isinstance(m, at.Gt):
            low = ("(", m.gt)
        elif isinstance(m, at.Le):
            high = ("]", m.le)
        elif isinstance(m, at.Lt):
            high = (")", m.lt)
        elif isinstance(m, at.MinLen):
            lo = m.min_length
        elif isinstance(m, at.MaxLen):
            hi = m.max_length
        elif getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    if low and high:
        out.insert(0, f"{low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}")
    elif low:
        out.insert(0, f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}")
    elif high:
        out.insert(0, f"{'<=' if high[0] == ']' else '<'} {_number(high[1])}")
    size = lambda n: f"{n} {unit if n != 1 else unit[:-1]}"   # noqa: E731
    if lo is not None and lo == hi:
        out.insert(0, f"exactly {size(lo)}")
    else:
        if hi is not None:
            out.insert(0, f"at most {size(hi)}")
        if lo is not None:
            out.insert(0, f"at least {size(lo)}")
    return out


def _literal(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    return str(v)


def describe_type(tp: Any, meta: Optional[list] = None) -> Tuple[str, List[str]]:
    """(type in words, allowed values or bounds) of an annotation and its field constraints."""
    tp, nullable = _strip_optional(tp)
    tp, inner_meta = _unannotated(tp)
    meta = list(meta or []) + inner_meta
    origin = get_origin(tp)
    allowed: List[str] = []
    if origin is Literal:
        values = get_args(tp)
        kinds = ["bool" if isinstance(v, bool) else type(v).__name__ for v in values]
        text = " or ".join(dict.fromkeys(kinds))
        allowed = [", ".join(f"`{_literal(v)}`" for v in values)]
    elif origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in get_args(tp)]
        text = " or ".join(p[0] for p in parts)
        allowed = [b for p in parts for b in p[1]]
    elif origin in (list, List, AbcSequence):
        item = get_args(tp)[0] if get_args(tp) else Any
        sub, _ = _section_of(item)
        if sub is not None:
            text = "list of sections"
        else:
            item_text, item_allowed = describe_type(item)
            text = f"list of {item_text}"
            allowed = [f"each in {a}" if a[0] in "[(" else f"each {a}" for a in item_allowed]
        allowed = _bounds(meta, "entries") + allowed
        meta = []
    elif origin in (dict, typing.Dict, AbcMapping):
        k, v = get_args(tp) or (Any, Any)
        v_text, v_allowed = describe_type(v)
        text = f"map of {describe_type(k)[0]} to {v_text}"
        allowed = [f"each value in {a}" if a[0] in "[(" else f"each value {a}" for a in v_allowed]
    elif _is_section(tp):
        text = "section"
    else:
        text = getattr(tp, "__name__", str(tp))
    if meta:
        allowed = _bounds(meta, "characters" if tp is str else "entries") + allowed
    if nullable:
        text += " or null"
    return text, allowed


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""
    if value is None or isinstance(value, bool):
        return f"`{json.dumps(value)}`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float):
        return f"`{value!r}`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    """Markdown table cell: pipes escaped; `<` escaped outside code spans (not taken as HTML)."""
    parts = text.replace("\n", " ").split("`")
    parts = [p if i % 2 else p.replace("<", "\\<") for i, p in enumerate(parts)]
    return "`".join(parts).replace("|", "\\|")


def anchor(heading: str) -> str:
    """The link target GitHub gives a heading: lower case, punctuation dropped, spaces as '-'."""
    keep = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def row(path: str, field: FieldInfo) -> str:
    """One table row: key, type, default, allowed values or bounds, meaning."""
    kind, allowed = describe_type(field.annotation, field.metadata)
    sub, is_list = _section_of(field.annotation)
    default = _default(field)
    if sub is not None:
        target = path + ("[]" if is_list else "")
        kind = (f"list of [`{target}`](#{anchor(target)}) entries" if is_list
                else f"section, [below](#{anchor(target)})")
        kind += " or null" if _strip_optional(field.annotation)[1] else ""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if not allowed and extra.get("enum"):   # a name checked against a registry: the built-ins
        allowed = [", ".join(f"`{v}`" for v in extra["enum"])]
    cells = [f"`{path}`", kind, default, "; ".join(allowed), field.description or ""]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


_HEAD = "| key | type | default | allowed | meaning |\n|---|---|---|---|---|"


def _doc(obj: Any) -> str:
    """A class docstring as one paragraph (its lines joined)."""
    text = (obj.__doc__ or "").strip()
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _table(prefix: str, section: Type[BaseModel]) -> List[str]:
    rows = [row(prefix + name, f) for name, f in section.model_fields.items()]
    return [_HEAD, *rows] if rows else []


# ---------------------------------------------------------------- the page

_INTRO = f"""\
# Config reference

<!-- Generated from the pydantic schema in ctrkit/config.py by `{COMMAND}`.
     Do not edit by hand: change the field's description in ctrkit/config.py and regenerate
     (tests/test_config_doc.py checks that this file is current). -->

One YAML file holds the whole tree; every key below can also be given on the command line as
`key=value` (the value is YAML: `train.epochs=3`, `model.hidden_units=[400,400]`,
`data.valid=null`). Unknown keys and values outside the bounds are refused when the config loads,
with one line naming the key. Relative paths in a config file resolve against the file's folder;
relative paths given as overrides or left at their defaults, against the working directory.
Intervals: `[0, 1)` means 0 <= x < 1.

Sections: {{sections}}.
"""

_MODEL_KEYS = ("The built-in models' keys, read from their constructors' signatures (the config "
               "checks the `model:` section against them). A constructor documents a key with "
               "`Annotated[type, Field(description=...)]`; the meaning column shows it.")


def _model_keys() -> List[str]:
    """The built-in models' constructor keys (plug-in models document their own)."""
    out: List[str] = [_MODEL_KEYS]
    for name in available_models():
        cls = get_model_class(name)
        if not cls.__module__.startswith("ctrkit."):
            continue
        args = constructor_arguments(name)
        out += ["", f"### model: {name}", "", f"`{cls.__module__}.{cls.__qualname__}`: {_doc(cls)}",
                ""]
        if not args.model_fields:
            out.append("No keys besides `name`.")
            continue
        out.append(_HEAD)
        out += [row(f"model.{k}", f) for k, f in args.model_fields.items()]
    return out


def render() -> str:
    """docs/config.md as a string."""
    top = list(Config.model_fields)
    lines = [_INTRO.replace("{sections}", ", ".join(f"[`{s}`](#{anchor(s)})" for s in top))]
    for path, section in sections():
        if not path:
            continue
        name = path[:-1]
        lines += [f"{'##' if name in top else '###'} {name}", ""]
        intro = _doc(section) or _field_at(name).description
        if intro:
            lines += [_cell(intro), ""]
        lines += _table(path, section) + [""]
        if name == "model":
            lines += _model_keys() + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _field_at(dotted: str) -> FieldInfo:
    """The field of a section's dotted path (`train.early_stop`, `data.features[]`)."""
    node: Type[BaseModel] = Config
    field: Optional[FieldInfo] = None
    for part in dotted.split("."):
        field = node.model_fields[part.removesuffix("[]")]
        node = _section_of(field.annotation)[0] or node
    assert field is not None
    return field


if __name__ == "__main__":
    sys.stdout.write(render())
