"""train.ema_decay: the lazy row average equals a dense EMA of every weight, costs O(rows touched)
per step, and is what a run evaluates, keeps as best and resumes."""
import json

import pytest
import torch
from torchrec import KeyedJaggedTensor

from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
from ctrkit.optim.sparse import RowSparseAdam
from ctrkit.train.ema import WeightEMA
from tests.conftest import LAPIS_CRITEO


class _Tiny(torch.nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.bags = BatchedEmbeddingBags([table_config(f"t{i}", f"f{i}", rows, 4) for i in range(2)],
                                         init_std=0.1)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t, b = ids.shape
        kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=ids.reshape(-1),
                                lengths=torch.ones(t * b, dtype=torch.int32), stride=b)
        return self.out(self.bags(kjt).reshape(b, -1)).squeeze(1)


def test_lazy_row_average_equals_dense_ema_and_touches_only_batch_rows():
    torch.manual_seed(0)
    rows, d = 50, 0.8
    model = _Tiny(rows)
    opts = [RowSparseAdam([model.bags.weight], lr=0.05),
            torch.optim.Adam(model.out.parameters(), lr=0.05)]
    ema = WeightEMA(model, d)
    params = list(model.parameters())
    ref = [torch.zeros_like(p) for p in params]   # dense EMA of every weight, zero start
    for step in range(1, 16):
        ids = torch.randint(0, 10 if step < 8 else rows, (2, 6))   # late rows first seen late
        model(ids).square().mean().backward()
        ema.capture()
        last_before = ema.table_last[0].clone()
        for o in opts:
            o.step()
        ema.update()
        for o in opts:
            o.zero_grad(set_to_none=True)
        touched = torch.unique(ids + model.bags.row_offsets[:, None])
        changed = (ema.table_last[0] != last_before).nonzero().squeeze(1)
        assert torch.equal(changed, touched)      # the step updated only the batch's rows
        with torch.no_grad():
            for r, p in zip(ref, params):
                r.mul_(d).add_(p, alpha=1 - d)
        if step in (3, 9, 15):
            raw = [p.detach().clone() for p in params]
            with ema.applied():
                for r, p in zip(ref, params):
                    torch.testing.assert_close(p.detach(), r / (1 - d ** step), rtol=1e-5, atol=1e-6)
            for a, p in zip(raw, params):
                assert torch.equal(a, p.detach())   # the model gets its own weights back
    # rows never touched average to their (unchanged) initial weight
    never = torch.ones(model.bags.num_rows, dtype=torch.bool)
    never[:10] = False
    never[rows:rows + 10] = False
    with ema.applied():
        avg = model.bags.weight.detach().clone()
    assert torch.allclose(avg[never & (ema.table_last[0] == 0)],
                          model.bags.weight.detach()[never & (ema.table_last[0] == 0)])


def test_state_round_trip_continues_identically():
    torch.manual_seed(1)
    model = _Tiny(30)
    opt = RowSparseAdam([model.bags.weight], lr=0.05)
    ema = WeightEMA(model, 0.9)
    for _ in range(4):
        model(torch.randint(0, 30, (2, 5))).sum().backward()
        ema.capture(); opt.step(); ema.update(); opt.zero_grad(set_to_none=True)
    st = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in ema.state_dict().items()}
    other = WeightEMA(model, 0.9)
    other.load_state_dict(st)
    with ema.applied():
        a = [p.detach().clone() for p in model.parameters()]
    with other.applied():
        b = [p.detach().clone() for p in model.parameters()]
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ema_config_refuses_gossip_and_fused_tables():
    from ctrkit.config import load_config
    from ctrkit.errors import ConfigError
    with pytest.raises(ConfigError, match="train.ema_decay: not with distributed.algorithm=damsgrad"):
        load_config(None, ["train.ema_decay=0.9", "distributed.algorithm=damsgrad"])
    with pytest.raises(ConfigError, match="optimizer.sparse.fused=true"):
        load_config(None, ["train.ema_decay=0.9", "optimizer.sparse.name=sgd",
                           "optimizer.sparse.fused=true"])
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(None, ["train.ema_decay=1.0"])


@pytest.mark.shared_data
def test_run_evaluates_keeps_and_exports_the_average(make_cfg, tmp_path):
    from ctrkit.train.checkpoint import load_checkpoint
    from ctrkit.train.run import evaluate, train
    data = {"format": "criteo_tsv", "train": str(LAPIS_CRITEO / "train.csv"),
            "valid": str(LAPIS_CRITEO / "dev.csv"), "dense_transform": "criteo_bucket"}
    kw = {"batch_size": 512, "epochs": 1, "eval_every": 7}
    cfg = make_cfg(data, "train.ema_decay=0.8", "model.hidden_units=[32,16]", train=kw)
    m = train(cfg).metrics
    ck = tmp_path / "run" / "checkpoints"
    best, last = load_checkpoint(ck / "best.pt"), load_checkpoint(ck / "last.pt")
    assert last["ema"]["step"] == m["steps"] == 15
    # best.pt holds the averaged weights, last.pt the raw ones (to resume) and the average
    w = "embedding.bags.weight" if "embedding.bags.weight" in best["model"] else next(
        k for k in best["model"] if k.endswith("weight") and best["model"][k].dim() == 2)
    assert not torch.equal(best["model"][w], last["model"][w])
    again = evaluate(cfg)
    assert again["valid"]["auc"] == pytest.approx(m["valid"]["auc"], abs=1e-9)
    if m["best_step"] == 15:   # the run ended at its best evaluation
        # last.pt's average, as eval and train.init_from load it, is best.pt's weights
        from ctrkit.data.schema import Schema
        from ctrkit.train.ema import load_averaged_weights
        from ctrkit.train.setup import build_training_model
        model = build_training_model(cfg, Schema.load(tmp_path / "prepared"), torch.device("cpu"))
        load_averaged_weights(model, last)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, best["model"][k], rtol=1e-5, atol=1e-7)
        # with no best.pt, eval of last.pt evaluates the average too
        (ck / "best.pt").unlink()
        assert evaluate(cfg)["valid"]["auc"] == pytest.approx(m["valid"]["auc"], abs=1e-6)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "valid" in saved


def test_trainer_refuses_ema_with_gossip_even_past_the_config_check(tmp_path):
    """A config edited after validation (model_copy skips validators) is caught by the trainer."""
    from ctrkit.config import load_config
    from ctrkit.errors import ConfigError
    from ctrkit.train.trainer import Trainer
    cfg = load_config(None, ["distributed.algorithm=damsgrad"])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"ema_decay": 0.9})})
    assert cfg.train.ema_decay == 0.9
    with pytest.raises(ConfigError, match="train.ema_decay: not with distributed.algorithm=damsgrad"):
        Trainer(cfg, _tiny_schema(tmp_path), tmp_path / "run")


def _tiny_schema(tmp_path):
    from ctrkit.config import load_config
    from ctrkit.data.preprocess import prepare
    from ctrkit.data.synth import write_synthetic
    write_synthetic(tmp_path / "raw", 300, valid_rows=50, test_rows=0, seed=0, card_scale=0.01,
                    progress=False)
    return prepare(load_config(None, [f"data.train={tmp_path / 'raw' / 'train.tsv'}",
                                      f"data.prepared_dir={tmp_path / 'prep'}"]), progress=False)
