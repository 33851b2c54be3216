"""Distribution strategies: the registry the config validates against, a toy strategy registered
from this file that trains end to end, and learning-rate scaling as a pure function."""
import pytest
import torch

from ctrkit.config import load_config
from ctrkit.distributed.runtime import DistEnv
from ctrkit.errors import ConfigError
from ctrkit.optim.build import LearningRates, split_parameters
from ctrkit.registry import STRATEGIES, Registry
from ctrkit.strategies import Strategy, build_strategy, strategy_class
from ctrkit.strategies.lr_scaling import worker_lr_scale
from ctrkit.train.checkpoint import load_checkpoint
from tests.conftest import LAPIS_CRITEO

CRITEO_DATA = {"format": "criteo_tsv", "train": str(LAPIS_CRITEO / "train.csv"),
               "valid": str(LAPIS_CRITEO / "dev.csv"), "dense_transform": "criteo_bucket",
               "min_count": 2}


class FrozenDense(Strategy):
    """A toy: one rank whose dense gradients are zeroed after backward, so only the tables learn
    (Adam from zero moments then never moves the dense parameters). It counts its steps in its
    checkpoint state and refuses a weight average."""
    name = "frozen_dense"
    weight_average_conflict = "the toy says no"

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.calls = 0

    def after_backward(self, model):
        for p in split_parameters(model)[1]:
            if p.grad is not None:
                p.grad.zero_()
        self.calls += 1

    def state_dict(self):
        return {**super().state_dict(), "frozen_dense_calls": self.calls}

    def load_state_dict(self, st):
        super().load_state_dict(st)
        self.calls = st["frozen_dense_calls"]


@pytest.fixture
def toy():
    STRATEGIES.register("frozen_dense")(FrozenDense)
    yield FrozenDense
    STRATEGIES.unregister("frozen_dense")


def test_config_validates_the_algorithm_against_the_registry(toy):
    assert load_config(None, ["distributed.algorithm=frozen_dense"]).distributed.algorithm == \
        "frozen_dense"
    assert strategy_class("frozen_dense") is FrozenDense
    with pytest.raises(ConfigError, match="train.ema_decay: not with distributed.algorithm="
                                          "frozen_dense \\(the toy says no\\)"):
        load_config(None, ["distributed.algorithm=frozen_dense", "train.ema_decay=0.9"])
    STRATEGIES.unregister("frozen_dense")
    with pytest.raises(ConfigError, match="distributed.algorithm: unknown algorithm 'frozen_dense' "
                                          "\\(known: local, allreduce, dpsgd, damsgrad, choco\\)"):
        load_config(None, ["distributed.algorithm=frozen_dense"])


def test_builtin_strategies_are_one_module_each():
    for name, module in [("local", "ctrkit.strategies.local"),
                         ("allreduce", "ctrkit.strategies.allreduce"),
                         ("damsgrad", "ctrkit.strategies.gossip")]:
        cls = strategy_class(name)
        assert cls.name == name and cls.__module__ == module
    # allreduce on one worker is local; the gossip family keeps its own rule at n = 1
    cfg = load_config(None, ["distributed.algorithm=allreduce"])
    assert build_strategy(cfg, DistEnv()).name == "local"
    assert build_strategy(load_config(None, ["distributed.algorithm=choco"]), DistEnv()).name == "choco"


def test_a_registry_refuses_a_name_taken_by_another_object():
    reg = Registry("thing", {"a": "ctrkit.strategies.local:LocalStrategy"})
    reg.register("b")(int)
    reg.register("b")(int)   # the same object again: fine
    with pytest.raises(ValueError, match="thing 'b' is already registered"):
        reg.register("b")(float)
    assert reg.names() == ["a", "b"] and reg.get("a").name == "local"
    with pytest.raises(KeyError, match="unknown thing 'c' \\(known: a, b\\)"):
        reg.get("c")


@pytest.mark.shared_data
def test_a_toy_strategy_registered_here_trains_and_resumes(toy, make_cfg, tmp_path):
    from ctrkit.train.run import train
    common = ("distributed.algorithm=frozen_dense", "model.hidden_units=[16]")
    kw = {"batch_size": 512, "epochs": 1, "eval_every": 5}
    m = train(make_cfg(CRITEO_DATA, *common, "train.max_steps=6", train=kw)).metrics
    assert m["steps"] == 6 and m["valid"]["auc"] > 0.5
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["frozen_dense_calls"] == 6
    train(make_cfg(CRITEO_DATA, *common, "train.max_steps=9", "train.resume=true", train=kw))
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["frozen_dense_calls"] == 9   # its state came back from the checkpoint
    # the strategy's step ran: the MLP never moved from its seeded start, the tables did
    from ctrkit.data.schema import Schema
    from ctrkit.train.setup import build_training_model, seed_everything
    cfg = make_cfg(CRITEO_DATA, *common, train=kw)
    seed_everything(cfg.train.seed)
    start = build_training_model(cfg, Schema.load(tmp_path / "prepared")).state_dict()
    mlp = [k for k in start if k.startswith("mlp") and k.endswith("weight")]
    assert mlp and all(torch.equal(start[k], last["model"][k]) for k in mlp)
    tables = [k for k in start if start[k].dim() == 2 and k not in mlp]
    assert any(not torch.equal(start[k], last["model"][k]) for k in tables)


def test_learning_rate_scaling_is_a_pure_function():
    cfg = load_config(None, ["distributed.algorithm=damsgrad", "distributed.lr_scaling=sqrt",
                             "optimizer.dense.lr=0.01", "optimizer.sparse.lr=0.1",
                             "optimizer.sparse.lr_overrides={linear: 0.5}"])
    before = cfg.model_dump()
    rates = build_strategy(cfg, DistEnv(rank=0, world=4)).learning_rates()
    assert cfg.model_dump() == before   # the config is not rewritten
    assert rates.scale == (2.0, 2.0) and rates.dense == 0.02 and rates.tables == 0.2
    assert rates.table_overrides == {"linear": 1.0}
    assert LearningRates.of(cfg.optimizer).scaled(1.0, 1.0).scale == (1.0, 1.0)
    # the rule is the strategy's: local never scales, dpsgd is linear
    assert worker_lr_scale("sqrt", "local", 4) == (1.0, 1.0)
    assert worker_lr_scale("auto", "dpsgd", 4, dense_adaptive=True) == (4.0, 4.0)
