"""docs/config.md is generated from the config schema (ctrkit/config_doc.py) and must be current:
a new key without a description, or a schema change without `python -m ctrkit.config_doc >
docs/config.md`, fails here."""
from pathlib import Path
from typing import List, Optional

from pydantic import BaseModel, Field

from ctrkit import config_doc
from ctrkit.config import Config
from ctrkit.models.registry import available_models, constructor_arguments, get_model_class

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_docs_config_md_is_what_the_generator_renders():
    assert DOC.is_file(), f"{DOC} is missing: run `{config_doc.COMMAND}`"
    assert DOC.read_text() == config_doc.render(), (
        f"docs/config.md is out of date with ctrkit/config.py: run `{config_doc.COMMAND}`")


def test_every_key_of_the_schema_has_a_row():
    text = DOC.read_text()
    paths = [path for path, _ in config_doc.all_fields()]
    assert "distributed.gossip_tol" in paths and "data.features[].name" in paths
    assert "train.early_stop.patience" in paths
    # a top-level section is a heading, every other key a row
    missing = [p for p in paths if (f"\n## {p}\n" if "." not in p else f"| `{p}` |") not in text]
    assert not missing, f"keys without a row in docs/config.md: {missing}"
    # and the walk misses no section: as many keys as the schema's own count
    def count(model) -> int:
        n = 0
        for f in model.model_fields.values():
            n += 1
            sub, _ = config_doc._section_of(f.annotation)
            n += count(sub) if sub is not None else 0
        return n
    assert len(paths) == len(set(paths)) == count(Config)


def test_every_key_has_a_description():
    assert config_doc.undocumented() == [], (
        "config keys without Field(description=...) in ctrkit/config.py")


def test_a_key_without_a_description_is_found():
    class Inner(BaseModel):
        documented: int = Field(default=1, description="one")
        bare: int = 2

    class Outer(BaseModel):
        inner: Inner = Field(default=Inner(), description="a section")
        items: Optional[List[Inner]] = Field(default=None, description="a list of sections")
        plain: str = "x"

    assert config_doc.undocumented(Outer) == ["plain", "inner.bare", "items[].bare"]


def test_built_in_models_keys_are_listed():
    text = DOC.read_text()
    for name in available_models():
        if not get_model_class(name).__module__.startswith("ctrkit."):
            continue
        assert f"### model: {name}" in text
        for key in constructor_arguments(name).model_fields:
            assert f"| `model.{key}` |" in text


def test_types_defaults_and_bounds_are_rendered():
    text = DOC.read_text()
    assert "| `optimizer.sparse.betas` | list of float | `[0.9, 0.999]` | exactly 2 entries; " \
           "each in [0, 1) |" in text
    assert "| `distributed.gamma` | float | `0.5` | (0, 1] |" in text
    assert "| `data.header` | str or bool | `auto` | `auto`, `true`, `false` |" in text
    assert "| `data.features[].name` | str | required |" in text
    assert "| `distributed.dense_compressor` | str or null | `sign` |" in text
