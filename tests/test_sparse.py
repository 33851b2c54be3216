"""Embedding steps cost O(rows touched): sparse gradients, lazy state, untouched rows bit-identical."""
import pytest
import torch
from torchrec import KeyedJaggedTensor

from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
from ctrkit.optim.sparse import RowSparseAdagrad, RowSparseAdam, RowSparseSGD


def _bags(rows, tables=3, dim=4):
    torch.manual_seed(0)
    return BatchedEmbeddingBags([table_config(f"t{i}", f"f{i}", rows, dim) for i in range(tables)],
                                init_std=0.1)


def _kjt(ids):  # ids: [tables, B]
    t, b = ids.shape
    return KeyedJaggedTensor(keys=[f"f{i}" for i in range(t)], values=ids.reshape(-1),
                             lengths=torch.ones(t * b, dtype=torch.int32), stride=b)


@pytest.mark.parametrize("opt", ["adam", "amsgrad", "adam_rowwise", "rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("rows", [1000, 1_000_000])
def test_only_touched_rows_change(opt, rows):
    bags = _bags(rows)
    o = {"adam": lambda p: RowSparseAdam(p, lr=0.01, weight_decay=0.01),
         "amsgrad": lambda p: RowSparseAdam(p, lr=0.01, amsgrad=True),
         "adam_rowwise": lambda p: RowSparseAdam(p, lr=0.01, rowwise=True),
         "rowwise_adagrad": lambda p: RowSparseAdagrad(p, lr=0.1),
         "sgd": lambda p: RowSparseSGD(p, lr=0.1, weight_decay=0.01)}[opt]([bags.weight])
    ids = torch.tensor([[3, 5, 3, 7], [0, 0, 1, 999], [10, 11, 12, 13]])
    before = bags.weight.detach().clone()
    out = bags(_kjt(ids))
    assert out.shape == (4, 3, 4)
    (out * torch.randn_like(out)).sum().backward()
    g = bags.weight.grad
    # the gradient is row-sparse: one row per distinct touched id, whatever the table size
    touched = torch.unique(ids + bags.row_offsets[:, None])
    assert g.is_sparse and g.is_coalesced()
    assert torch.equal(g._indices()[0], touched)
    assert g._values().shape == (touched.numel(), 4)
    for _ in range(2):
        o.step()
    after = bags.weight.detach()
    mask = torch.zeros(bags.num_rows, dtype=torch.bool)
    mask[touched] = True
    assert torch.equal(after[~mask], before[~mask])          # untouched rows bit-identical
    assert (after[mask] != before[mask]).any(dim=1).all()    # every touched row moved
    for st in o.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() == 2:
                assert torch.count_nonzero(v[~mask]) == 0      # state untouched outside the batch


@pytest.mark.parametrize("amsgrad", [False, True])
def test_lazy_adam_equals_adam_when_every_row_is_touched(amsgrad):
    torch.manual_seed(0)
    w0 = torch.randn(6, 3)
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    oa = RowSparseAdam([a], lr=0.05, amsgrad=amsgrad, weight_decay=0.01)
    ob = torch.optim.Adam([b], lr=0.05, amsgrad=amsgrad, weight_decay=0.01)
    for _ in range(5):
        g = torch.randn(6, 3)
        idx = torch.randperm(6)
        a.grad = torch.sparse_coo_tensor(idx[None], g[idx], (6, 3))   # uncoalesced order
        b.grad = g.clone()
        oa.step()
        ob.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_duplicate_rows_are_summed():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    o = RowSparseSGD([p], lr=1.0)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), torch.ones(3, 2), (4, 2))
    o.step()
    assert torch.equal(p.detach(), torch.tensor([[0., 0.], [-2., -2.], [0., 0.], [-1., -1.]]))


def test_eval_path_matches_training_path_and_torchrec_export():
    bags = _bags(50)
    ids = torch.randint(0, 50, (3, 8))
    kjt = _kjt(ids)
    train_out = bags(kjt)
    with torch.no_grad():
        eval_out = bags(kjt)
    assert torch.allclose(train_out, eval_out)
    ebc = bags.to_torchrec()
    kt = ebc(kjt)
    ref = torch.stack([kt[f"f{i}"] for i in range(3)], dim=1)
    assert torch.allclose(ref, eval_out, atol=1e-6)


def test_multi_hot_bags_use_embedding_bag():
    bags = _bags(20, tables=2)
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([1, 2, 3, 4, 4, 5]),
                            lengths=torch.tensor([2, 1, 0, 3], dtype=torch.int32), stride=2)
    out = bags(kjt)
    w0, w1 = bags.table_weight(0).detach(), bags.table_weight(1).detach()
    assert torch.allclose(out[0, 0], w0[1] + w0[2]) and torch.allclose(out[1, 0], w0[3])
    assert torch.allclose(out[0, 1], torch.zeros(4)) and torch.allclose(out[1, 1], 2 * w1[4] + w1[5])
    out.sum().backward()
    assert torch.equal(bags.weight.grad._indices()[0], torch.tensor([1, 2, 3, 24, 25]))


def test_fused_fbgemm_rowwise_adagrad_matches_native():
    """fbgemm's fused TBE update and our row-sparse row-wise Adagrad are the same algorithm."""
    from ctrkit.models.fused import FusedEmbeddingBags
    native = _bags(100, tables=3, dim=8)
    fused = FusedEmbeddingBags(_bags(100, tables=3, dim=8), "rowwise_adagrad", lr=0.1)
    _step_together(native, fused, [RowSparseAdagrad([native.weight], lr=0.1, rowwise=True)], 1)
    for i in range(3):
        assert torch.allclose(native.table_weight(i).detach(), fused.table_weight(i), atol=1e-5)


def _step_together(native, fused, opts, seed: int, steps: int = 3) -> None:
    """The same squared-error steps on both modules; `opts` step after each backward."""
    torch.manual_seed(seed)
    for _ in range(steps):
        kjt = _kjt(torch.randint(0, 100, (3, 16)))
        target = torch.randn(16, 3, 8)
        for m in (native, fused):
            ((m(kjt) - target) ** 2).sum().backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)


def test_loader_precomputed_unique_matches_model_unique(tmp_path):
    """The loader's (feature << 32 | id) unique gives the same rows and inverse as the model's own."""
    from ctrkit.config import load_config
    from ctrkit.data.loader import BatchLoader
    from ctrkit.data.preprocess import prepare
    from ctrkit.data.synth import write_synthetic
    from ctrkit.models.base import FieldEmbeddings
    write_synthetic(tmp_path / "raw", 3000, seed=3, card_scale=0.01, progress=False)
    schema = prepare(load_config(None, [f"data.train={tmp_path / 'raw' / 'train.tsv'}",
                                        f"data.prepared_dir={tmp_path / 'prep'}"]), progress=False)
    emb = FieldEmbeddings(schema, 8, init_std=0.1)
    bag = emb.bags["8"]
    batch = next(iter(BatchLoader(schema, "train", 500, shuffle=True)))
    assert batch.facts.unique is not None
    fast = bag(batch.sparse, batch.facts)
    rows_fast, ids_fast = bag._distinct(batch.sparse, True, batch.facts)
    fast.square().sum().backward()
    grad_fast = bag.weight.grad.to_dense()
    bag.weight.grad = None
    batch.facts.unique = None
    batch.facts.shared.clear()
    slow = bag(batch.sparse, batch.facts)
    assert torch.equal(fast, slow)
    slow.square().sum().backward()
    torch.testing.assert_close(grad_fast, bag.weight.grad.to_dense())
    # The segment-sum backward equals autograd's own gather backward.
    ref = bag.weight.detach().clone().requires_grad_()
    idx = bag.flat_indices(batch.sparse).view(len(bag.tables), -1).t().reshape(-1)
    ref.index_select(0, idx).square().sum().backward()
    torch.testing.assert_close(grad_fast, ref.grad)
    assert torch.equal(rows_fast, torch.unique(idx))


def test_fused_tables_learning_rate_is_an_ordinary_optimizers():
    """A fused module's `fused_optimizer` is in build_optimizers' list, and the lr a schedule or
    LR-on-plateau writes into its param group is the one the next backward updates with: after a
    cut to 0.02 it steps as row-wise Adagrad at 0.02."""
    from ctrkit.config import OptimizerConfig
    from ctrkit.models.fused import FusedEmbeddingBags
    from ctrkit.optim.build import build_optimizers

    class Tables(torch.nn.Module):
        def __init__(self, bags):
            super().__init__()
            self.bags = bags

    native = _bags(100, tables=3, dim=8)
    fused = FusedEmbeddingBags(_bags(100, tables=3, dim=8), "rowwise_adagrad", lr=0.5)
    cfg = OptimizerConfig(sparse={"name": "rowwise_adagrad", "lr": 0.1, "fused": True})
    opts = build_optimizers(Tables(fused), cfg)
    assert opts == [fused.fused_optimizer] and opts[0].param_groups[0]["lr"] == 0.1
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opts[0], factor=0.2, patience=0)
    plateau.step(1.0)
    plateau.step(2.0)   # no better: 0.1 -> 0.02
    _step_together(native, fused, [RowSparseAdagrad([native.weight], lr=0.02, rowwise=True),
                                   opts[0]], 2)
    for i in range(3):
        assert torch.allclose(native.table_weight(i).detach(), fused.table_weight(i), atol=1e-5)
