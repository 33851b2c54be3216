"""Models take tensors (`forward(dense, sparse) -> logits [B]`); the loader's facts reach their
table modules through `batch_facts` (ctrkit/data/batch.py), not as an argument."""
import pytest
import torch
from torchrec import KeyedJaggedTensor

from ctrkit.config import load_config
from ctrkit.data.batch import Batch, BatchFacts, batch_facts, current_facts
from ctrkit.models import build_model
from ctrkit.models.embedding import BatchedEmbeddingBags


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    from ctrkit.data.preprocess import prepare
    from ctrkit.data.synth import write_synthetic
    root = tmp_path_factory.mktemp("facts")
    write_synthetic(root / "raw", 600, seed=5, card_scale=0.01, progress=False)
    cfg = load_config(None, [f"data.train={root / 'raw' / 'train.tsv'}",
                             f"data.prepared_dir={root / 'prep'}"])
    return prepare(cfg, progress=False)


def _seen_facts(monkeypatch):
    seen = []
    forward = BatchedEmbeddingBags.forward

    def spy(self, kjt, facts=None):
        seen.append(facts)
        return forward(self, kjt, facts)
    monkeypatch.setattr(BatchedEmbeddingBags, "forward", spy)
    return seen


def test_batch_logits_hands_the_loaders_facts_to_every_table_module(schema, monkeypatch):
    from ctrkit.data.loader import BatchLoader
    cfg = load_config(None, ["model.name=deepfm", "model.hidden_units=[8]"])
    model = build_model(cfg.model, schema)
    batch = next(iter(BatchLoader(schema, "train", 64)))
    assert batch.facts.unique is not None
    seen = _seen_facts(monkeypatch)
    logits = batch.logits(model)
    assert logits.shape == (64,)
    # DeepFM's first-order weights and field embeddings: both see the loader's own facts
    assert len(seen) == 2 and all(f is batch.facts for f in seen)
    assert torch.equal(logits, model(batch.dense, batch.sparse))   # facts spare work, same result
    assert current_facts() is not batch.facts                       # nothing left set afterwards


def test_outside_batch_facts_each_module_gets_fresh_facts(schema, monkeypatch):
    model = build_model(load_config(None, ["model.name=fm"]).model, schema)
    names = [f.name for f in schema.sparse]
    b = 3
    kjt = KeyedJaggedTensor(keys=names, values=torch.zeros(len(names) * b, dtype=torch.int64),
                            lengths=torch.ones(len(names) * b, dtype=torch.int32), stride=b)
    seen = _seen_facts(monkeypatch)
    model(torch.zeros(b, len(schema.dense)), kjt)
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert all(isinstance(f, BatchFacts) and f.unique is None for f in seen)


def test_batch_facts_nests_and_resets():
    outer, inner = BatchFacts(one_per_bag=True), BatchFacts()
    with batch_facts(outer):
        assert current_facts() is outer
        with batch_facts(inner):
            assert current_facts() is inner
        assert current_facts() is outer
        with pytest.raises(RuntimeError), batch_facts(inner):
            raise RuntimeError
        assert current_facts() is outer
    assert current_facts() is not outer


def test_batch_logits_calls_the_model_with_tensors():
    dense, kjt = torch.ones(2, 1), KeyedJaggedTensor(keys=[], values=torch.zeros(0, dtype=torch.int64),
                                                     lengths=torch.zeros(0, dtype=torch.int32), stride=2)
    batch = Batch(dense, kjt, torch.zeros(2))
    got = batch.logits(lambda d, s: (d, s, current_facts()))
    assert got[0] is dense and got[1] is kjt and got[2] is batch.facts
