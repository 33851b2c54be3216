"""Training end to end on the real slices; checkpoint -> resume equals an uninterrupted run."""
import json

import pytest
import torch

from ctrkit.config import load_config
from ctrkit.models import available_models, build_model
from ctrkit.train.checkpoint import load_checkpoint
from ctrkit.train.run import train
from tests.conftest import CONFIGS, LAPIS_CRITEO

pytestmark = pytest.mark.shared_data

CRITEO_DATA = {"format": "criteo_tsv", "train": str(LAPIS_CRITEO / "train.csv"),
               "valid": str(LAPIS_CRITEO / "dev.csv"), "test": str(LAPIS_CRITEO / "test.csv"),
               "dense_transform": "criteo_bucket", "min_count": 2}


def test_registry_has_builtin_models():
    assert {"lr", "fm", "deepfm"} <= set(available_models())


def _shipped(name, tmp_path):
    """A shipped config with its outputs redirected into tmp_path."""
    return load_config(CONFIGS / name, [f"data.prepared_dir={tmp_path / 'prep'}",
                                        f"train.run_dir={tmp_path / 'run'}", "train.progress=false",
                                        "train.tensorboard=false", "train.threads=1"])


def test_deepfm_reaches_floor_on_real_criteo(tmp_path):
    res = train(_shipped("criteo_sample.yaml", tmp_path))
    m = res.metrics
    assert m["valid"]["auc"] >= 0.70 and m["test"]["auc"] >= 0.69
    saved = json.loads((res.run_dir / "metrics.json").read_text())
    assert saved["valid"]["auc"] == m["valid"]["auc"] and saved["samples"] == m["samples"]
    assert (res.run_dir / "metrics.csv").is_file() and (res.run_dir / "curves.png").is_file()


def test_deepfm_reaches_floor_on_real_avazu(tmp_path):
    m = train(_shipped("avazu_sample.yaml", tmp_path)).metrics
    assert m["valid"]["auc"] >= 0.69 and m["test"]["auc"] >= 0.69


@pytest.mark.parametrize("model", ["lr", "fm"])
def test_other_models_train(make_cfg, model):
    cfg = make_cfg(CRITEO_DATA, f"model.name={model}", "optimizer.sparse.lr=0.01",
                   train={"batch_size": 512, "epochs": 2})
    assert train(cfg).metrics["valid"]["auc"] > 0.6


def test_per_feature_embedding_dims(make_cfg):
    from ctrkit.data.loader import BatchLoader
    from ctrkit.data.preprocess import prepare
    cfg = make_cfg(CRITEO_DATA, "model.embedding_dims={C3: 4, C4: 4}", "model.batch_norm=true")
    schema = prepare(cfg, progress=False)
    model = build_model(cfg.model, schema)
    assert model.embedding.groups[4] == ["C3", "C4"]
    batch = next(iter(BatchLoader(schema, "train", 32)))
    assert batch.logits(model).shape == (32,)


@pytest.mark.parametrize("sparse_opt", ["adam", "adam train.ema_decay=0.9", "rowwise_adagrad",
                                       "rowwise_adagrad optimizer.sparse.fused=true"])
def test_resume_gives_the_same_parameters(make_cfg, tmp_path, sparse_opt):
    common = (*f"optimizer.sparse.name={sparse_opt}".split(), "model.dropout=0.3",
              "model.hidden_units=[32,16]")
    train_kw = {"batch_size": 512, "epochs": 2, "eval_every": 5, "shuffle": True}
    full = make_cfg(CRITEO_DATA, *common, f"train.run_dir={tmp_path / 'full'}", train=train_kw)
    train(full)
    part = make_cfg(CRITEO_DATA, *common, f"train.run_dir={tmp_path / 'part'}", "train.max_steps=19",
                    train=train_kw)
    r1 = train(part)
    assert r1.metrics["steps"] == 19 and r1.metrics["epochs"] == 1
    rest = make_cfg(CRITEO_DATA, *common, f"train.run_dir={tmp_path / 'part'}", "train.resume=true",
                    train=train_kw)
    r2 = train(rest)
    assert r2.metrics["steps"] == 2 * 15
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 30
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    if a.get("ema"):   # the weight average resumes exactly too
        for x, y in zip(a["ema"]["tables"] + a["ema"]["dense"], b["ema"]["tables"] + b["ema"]["dense"]):
            assert torch.equal(x, y)
    assert r2.metrics["valid"] == json.loads((tmp_path / "full" / "metrics.json").read_text())["valid"]


def test_entry_point_models_are_found(monkeypatch):
    """A plug-in package's `ctrkit.models` entry point makes its model selectable by name."""
    import ctrkit.models.registry as reg
    import ctrkit.registry
    from ctrkit.models.zoo import LogisticRegression
    from ctrkit.registry import MODELS

    class FakeEP:
        name = "plugin_lr"

        def load(self):
            return LogisticRegression

    monkeypatch.setattr(ctrkit.registry, "entry_points", lambda group: [FakeEP()] if group == "ctrkit.models" else [])
    monkeypatch.delitem(MODELS.entries, "plugin_lr", raising=False)
    assert reg.get_model_class("plugin_lr") is LogisticRegression
    assert "plugin_lr" in reg.available_models()
    MODELS.entries.pop("plugin_lr")
