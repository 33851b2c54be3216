"""Values torch would reject (or that train nonsense) fail when the config loads: one line naming
the key, exit status 2, never a traceback."""
from typing import Annotated

import pytest
from pydantic import Field
from torch import nn

import ctrkit.models.registry as registry
from ctrkit.cli import main
from ctrkit.config import load_config
from ctrkit.errors import ConfigError
from ctrkit.registry import MODELS
from tests.conftest import CONFIGS


def _error(capsys, *argv):
    """`ctrkit train ARGV` must stop at the config with exit 2 and one line; returns the line."""
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("ctrkit train: error: ")
    return err


@pytest.mark.parametrize("overrides,needle", [
    (["optimizer.sparse.betas=[1.5,0.999]"], "optimizer.sparse.betas.0: Input should be less than 1"),
    (["optimizer.sparse.betas=[0.9]"], "optimizer.sparse.betas: List should have at least 2 items"),
    (["optimizer.sparse.betas=[0.9,0.99,0.9]"], "optimizer.sparse.betas: List should have at most 2"),
    (["optimizer.sparse.betas=[-0.1,0.999]"], "optimizer.sparse.betas.0: Input should be greater"),
    (["optimizer.dense.betas=[0.9,1.5]"], "optimizer.dense.betas.1: Input should be less than 1"),
    (["optimizer.dense.betas=[1.5,0.999]"], "optimizer.dense.betas.0: Input should be less than 1"),
    (["model.embedding_dim=0"], "model.embedding_dim: Input should be greater than 0 (got 0)"),
    (["model.embedding_dim=-4"], "model.embedding_dim: Input should be greater than 0 (got -4)"),
    (["model.embedding_dim=2.5"], "model.embedding_dim: Input should be a valid integer"),
    (["model.hidden_units=[0]"], "model.hidden_units.0: Input should be greater than 0 (got 0)"),
    (["model.hidden_units=[400,-1]"], "model.hidden_units.1: Input should be greater than 0"),
    (["model.hidden_units=400,400"], "model.hidden_units: 'str' instances are not allowed"),
    (["model.hidden_units=400"], "model.hidden_units: Input should be an instance of Sequence"),
    (["model.dropout=2"], "model.dropout: Input should be less than 1 (got 2)"),
    (["model.dropout=1"], "model.dropout: Input should be less than 1 (got 1)"),
    (["model.dropout=-0.1"], "model.dropout: Input should be greater than or equal to 0"),
    (["model.init_std=-1"], "model.init_std: Input should be greater than or equal to 0 (got -1)"),
    (["model.init_std=.nan"], "model.init_std: Input should be a finite number"),
    (["model.batch_norm=maybe"], "model.batch_norm: Input should be a valid boolean"),
    (["model.embedding_dims={C3: 0}"], "model.embedding_dims.C3: Input should be greater than 0"),
    (["model.name=fm", "model.embedding_dim=0"], "model.embedding_dim: Input should be greater than 0"),
    (["model.name=fm", "model.init_std=0"], "model.init_std: Input should be greater than 0"),
    (["model.embeding_dim=8"],
     "unknown key 'model.embeding_dim' for model 'deepfm' (did you mean 'model.embedding_dim'?)"),
    (["model.nmae=fm"], "unknown key 'model.nmae' for model 'deepfm' (did you mean 'model.name'?)"),
    (["model.name=fm", "model.hidden_units=[8]"],
     "unknown key 'model.hidden_units' for model 'fm' (known: name, embedding_dim, init_std)"),
    (["model.name=nosuch"], "model.name: unknown model 'nosuch' (known: "),
    (["train.epoch=3"], "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    (["trian.epochs=3"], "unknown key 'trian' (did you mean 'train'?)"),
    (["optimizer.sparse.weight_decy=0.1"],
     "unknown key 'optimizer.sparse.weight_decy' (did you mean 'optimizer.sparse.weight_decay'?)"),
    (["data.format=csv", "data.features=[{name: a, type: numeric, nmae: x}]"],
     "unknown key 'data.features.0.nmae' (did you mean 'data.features.0.name'?)"),
    (["model.hidden_units=[400,"], "override 'model.hidden_units=[400,': invalid YAML value ("),
    (["model.embedding_dims={C3: 4"], "override 'model.embedding_dims={C3: 4': invalid YAML value"),
    (["data.train=\"a.tsv"], "override 'data.train=\"a.tsv': invalid YAML value"),
    (["model.embedding_dims={C3: 4, C3: 8}"],
     "override 'model.embedding_dims={C3: 4, C3: 8}': duplicate key 'C3'"),
    (["=5"], "override '=5': the key must be a dotted path"),
    (["a..b=1"], "override 'a..b=1': the key must be a dotted path"),
    (["train.=1"], "override 'train.=1': the key must be a dotted path"),
    (["optimizer.sparse.lr_overrides={linear: 0}"],
     "optimizer.sparse.lr_overrides.linear: Input should be greater than 0"),
    (["optimizer.sparse.lr_overrides={linear: -1.0e-2}"], "optimizer.sparse.lr_overrides.linear"),
    (["optimizer.dense.lr=.inf"], "optimizer.dense.lr: Input should be a finite number"),
    (["optimizer.sparse.weight_decay=.inf"], "optimizer.sparse.weight_decay: Input should be a finite"),
    (["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),
    (["train.seed=4294967296"], "train.seed: Input should be less than 4294967296"),
    (["synth.seed=-1"], "synth.seed"),
    (["synth.max_card=4294967297"], "synth.max_card"),
    (["distributed.timeout_s=.inf"], "distributed.timeout_s: Input should be a finite number"),
    (['data.delimiter=""'], "data.delimiter: String should have at least 1 character"),
    (["data.delimiter=;;"], "data.delimiter: String should have at most 1 character"),
    (["optimizer.schedule.name=cosine", "optimizer.schedule.warmup_steps=100",
      "optimizer.schedule.total_steps=100"],
     "optimizer.schedule: warmup_steps (100) must be below total_steps (100)"),
])
def test_bad_values_fail_at_load_naming_the_key(capsys, overrides, needle):
    assert needle in _error(capsys, *overrides)


def test_good_values_still_load():
    cfg = load_config(None, ["optimizer.sparse.betas=[0,0.5]", "optimizer.dense.betas=[0.5,0.9]",
                             "model.hidden_units=[]", "model.dropout=0", "model.init_std=0",
                             "model.embedding_dims={C3: 4}", "optimizer.sparse.lr_overrides={linear: 0.1}",
                             "optimizer.schedule.warmup_steps=100", "data.delimiter=;"])
    assert cfg.optimizer.sparse.betas == [0.0, 0.5]
    assert cfg.model.model_extra["hidden_units"] == [] and cfg.model.model_extra["init_std"] == 0
    assert load_config(None, ["model.name=lr"]).model.model_extra == {}


@pytest.mark.parametrize("value", ["/path/with:colon", "@home/x.tsv", "*.tsv", "!raw"])
def test_an_invalid_yaml_word_stays_a_string(value):
    assert load_config(None, [f"data.train={value}"]).data.train.endswith(value)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(CONFIGS / name)


def test_duplicate_keys_in_the_file_name_file_and_line(tmp_path, capsys):
    top = tmp_path / "top.yaml"
    top.write_text("train:\n  epochs: 2\nmodel:\n  name: fm\ntrain:\n  epochs: 3\n")
    assert _error(capsys, str(top)) == f"ctrkit train: error: {top}:5: duplicate key 'train'"
    deep = tmp_path / "deep.yaml"
    deep.write_text("optimizer:\n  sparse:\n    lr: 0.01\n    name: adam\n    lr: 0.1\n")
    assert _error(capsys, str(deep)) == f"ctrkit train: error: {deep}:5: duplicate key 'lr'"
    flow = tmp_path / "flow.yaml"
    flow.write_text("model: {name: deepfm, embedding_dims: {C3: 4, C3: 8}}\n")
    assert _error(capsys, str(flow)) == f"ctrkit train: error: {flow}:1: duplicate key 'C3'"


def test_a_merge_key_may_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("optimizer:\n  dense: &d {lr: 0.01, name: adam}\n  sparse:\n    <<: *d\n    lr: 0.1\n")
    cfg = load_config(p)
    assert cfg.optimizer.sparse.lr == 0.1 and cfg.optimizer.sparse.name == "adam"


def test_file_keys_get_suggestions_and_model_checks(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epoch: 3\n")
    assert _error(capsys, str(p)).endswith(f"{p}: unknown key 'train.epoch' (did you mean 'train.epochs'?)")
    p.write_text("model:\n  name: deepfm\n  hidden_units: [400, 0]\n")
    assert _error(capsys, str(p)).endswith(f"{p}: model.hidden_units.1: Input should be greater than 0 (got 0)")


def test_model_values_are_kept_as_validated():
    cfg = load_config(None, ["model.embedding_dim='8'", "model.dropout=0"])
    assert cfg.model.model_extra["embedding_dim"] == 8


class _Toy(nn.Module):
    def __init__(self, schema, depth: Annotated[int, Field(ge=2)] = 2, vocab: str = "v",
                 width=4) -> None:
        super().__init__()


class _Required(nn.Module):
    def __init__(self, schema, path: str) -> None:
        super().__init__()


class _Open(nn.Module):
    def __init__(self, schema, depth: Annotated[int, Field(ge=2)] = 2, **rest) -> None:
        super().__init__()


def test_a_registered_models_annotations_are_checked(monkeypatch):
    monkeypatch.setitem(MODELS.entries, "toy", _Toy)
    monkeypatch.setitem(MODELS.entries, "required", _Required)
    monkeypatch.setitem(MODELS.entries, "open", _Open)
    with pytest.raises(ConfigError, match=r"model\.depth: Input should be greater than or equal to 2"):
        load_config(None, ["model.name=toy", "model.depth=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.dpth' for model 'toy' \(did you mean 'model.depth'\?\)"):
        load_config(None, ["model.name=toy", "model.dpth=3"])
    with pytest.raises(ConfigError, match=r"model\.vocab: Input should be a valid string"):
        load_config(None, ["model.name=toy", "model.vocab=[1]"])
    with pytest.raises(ConfigError, match=r"model\.path: Field required"):
        load_config(None, ["model.name=required"])
    with pytest.raises(ConfigError, match=r"model\.depth: Input should be greater than or equal to 2"):
        load_config(None, ["model.name=open", "model.depth=0"])
    assert load_config(None, ["model.name=toy", "model.depth=3", "model.width=[1]"]).model.model_extra == \
        {"depth": 3, "width": [1]}
    assert load_config(None, ["model.name=open", "model.anything=1"]).model.model_extra == {"anything": 1}
    assert load_config(None, ["model.name=required", "model.path=x"]).model.model_extra == {"path": "x"}


def test_unknown_model_name_from_the_registry_stays_clear():
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'nosuch' \(known: .*deepfm"):
        registry.get_model_class("nosuch")


def test_a_pipe_delimiter_override_is_the_character():
    from ctrkit.config import load_config
    cfg = load_config(None, ["data.format=csv", "data.delimiter=|",
                             "data.features=[{name: a, type: categorical}]"])
    assert cfg.data.delimiter == "|"


def test_config_that_is_not_utf8_is_one_line(capsys, tmp_path):
    from ctrkit.cli import main
    p = tmp_path / "c.yaml"
    p.write_bytes(b"train:\n  epochs: 2 # caf\xe9\n")
    assert main(["prepare", str(p), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{p}: not UTF-8 text" in err and len(err.splitlines()) == 1


def test_feature_names_must_be_unique():
    from ctrkit.config import load_config
    from ctrkit.errors import ConfigError
    with pytest.raises(ConfigError, match="feature name 'c1' is used twice"):
        load_config(None, ["data.format=csv", "data.features=[{name: c1, type: categorical}, "
                           "{name: c1, type: numeric}]"])


def test_topology_mistakes_name_the_key(capsys, tmp_path):
    from ctrkit.cli import main
    code = main(["train", f"train.run_dir={tmp_path / 'r'}", "distributed.workers=2",
                 "distributed.algorithm=damsgrad", "distributed.topology=edges",
                 "distributed.edges=[[0,5]]", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "distributed.edges: topology edge [0, 5]" in err
