import pytest

from ctrkit.config import load_config
from ctrkit.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["model.embedding_dim=32", "train.batch_size=128",
                             "model.hidden_units=[64,32]", "optimizer.sparse.name=amsgrad"])
    assert cfg.model.model_extra["embedding_dim"] == 32
    assert cfg.model.model_extra["hidden_units"] == [64, 32]
    assert cfg.train.batch_size == 128
    assert cfg.optimizer.sparse.name == "amsgrad"


@pytest.mark.parametrize("override,needle", [
    ("train.batchsize=3", "unknown key 'train.batchsize'"),
    ("train.batch_size=abc", "train.batch_size"),
    ("optimizer.sparse.name=lion", "optimizer.sparse.name"),
    ("train.epochs=0", "train.epochs"),
    ("nonsense", "key=value"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("data: {train: ../raw/train.tsv, prepared_dir: prep}\n")
    cfg = load_config(p)
    assert cfg.data.train == str(tmp_path / "raw" / "train.tsv")
    assert cfg.data.prepared_dir == str(tmp_path / "sub" / "prep")


def test_generic_format_requires_features():
    with pytest.raises(ConfigError, match="data.features is required"):
        load_config(None, ["data.format=csv"])


def test_override_paths_are_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    """A config dumped into a run folder (the launcher's launch.yaml) must name the same files:
    a relative override would otherwise be re-read relative to the run folder."""
    from ctrkit.config import dump_config
    cfg_file = tmp_path / "conf" / "c.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text("data:\n  train: raw/train.tsv\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_file, ["train.run_dir=runs/x"])
    assert cfg.data.train == str(tmp_path / "conf" / "raw" / "train.tsv")
    assert cfg.train.run_dir == str(tmp_path / "runs" / "x")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "launch.yaml").write_text(dump_config(cfg))
    again = load_config(tmp_path / "runs" / "launch.yaml")
    assert again.train.run_dir == cfg.train.run_dir and again.data.train == cfg.data.train
