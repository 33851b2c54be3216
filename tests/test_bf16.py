"""predict's bf16 copy of a model: batch norm folded into the linear layers computes what the
norm computes (checked in float64, so only the algebra is tested), and the copy runs its MLPs and
other linear layers in bfloat16 while the original model is left as it was."""
import copy

import pytest
import torch
from torch import nn

from ctrkit.models.embedding import BatchedEmbeddingBags, table_config
from ctrkit.models.layers import MLP
from ctrkit.serving.bf16 import bf16_copy, fold_batch_norms


def _trained_norms(mlp: nn.Module, side: bool) -> None:
    """Running statistics and affine parameters far from their defaults."""
    g = torch.Generator().manual_seed(0)
    mlp.train()
    for _ in range(5):
        x = torch.randn(64, mlp.layers[0].in_features, generator=g, dtype=torch.float64) * 3 + 1
        s = torch.randn(64, mlp.side.in_features, generator=g, dtype=torch.float64) if side else None
        mlp(x, s)
    with torch.no_grad():
        for m in mlp.modules():
            if isinstance(m, nn.BatchNorm1d) and m.affine:
                m.weight.uniform_(0.5, 2.0, generator=g)
                m.bias.uniform_(-1.0, 1.0, generator=g)
    mlp.eval()


class Outer(nn.Module):
    """An MLP with a side input next to a linear layer that is not in an MLP."""

    def __init__(self, affine: bool):
        super().__init__()
        self.mlp = MLP(12, [16, 8], 1, batch_norm=True, side_dim=3)
        if not affine:
            for i, m in enumerate(self.mlp.layers):
                if isinstance(m, nn.BatchNorm1d):
                    self.mlp.layers[i] = nn.BatchNorm1d(m.num_features, affine=False)
        self.proj = nn.Linear(3, 4)
        self.table = BatchedEmbeddingBags([table_config("t", "t", 10, 4, "sum")])
        self.head = nn.Linear(3, 1)

    def forward(self, x, s):
        return self.mlp(x, s).squeeze(1) + self.proj(s).sum(1) + self.head(s).squeeze(1)


@pytest.mark.parametrize("affine", [True, False])
def test_folded_batch_norm_computes_what_the_norm_computes(affine):
    model = Outer(affine).double()
    _trained_norms(model.mlp, side=True)
    before = copy.deepcopy(model.state_dict())
    folded = fold_batch_norms(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    x = torch.randn(50, 12, dtype=torch.float64) * 3 + 1
    s = torch.randn(50, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, s), model(x, s), rtol=0, atol=1e-10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # untouched


def test_the_bf16_copy_runs_linear_layers_in_bfloat16_and_keeps_the_original():
    model = Outer(True)
    _trained_norms(model.mlp.double(), side=True)
    model.float()
    fast = bf16_copy(model)
    assert all(p.dtype == torch.bfloat16 for p in fast.mlp.parameters())
    assert all(p.dtype == torch.bfloat16 for p in fast.proj.parameters())
    assert all(p.dtype == torch.float32 for p in fast.head.parameters())   # a logit term
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert fast.table is model.table   # tables are shared, not copied
    x, s = torch.randn(40, 12) * 3 + 1, torch.randn(40, 3)
    with torch.no_grad():
        want, got = model(x, s), fast(x, s)
    assert got.dtype == torch.float32
    err = float((got - want).abs().max())
    assert 0 < err < 0.05 * float(want.abs().max())   # bf16's rounding, not another function


@pytest.mark.parametrize("fused", [True, False])
def test_linear_relu_is_relu_of_the_linear_layer(fused, monkeypatch):
    from ctrkit.serving import bf16
    if fused and bf16._fused_kernel() is None:
        pytest.skip("this torch has no fused oneDNN linear kernel")
    if not fused:
        monkeypatch.setattr(bf16, "_fused_kernel", lambda: None)
    lin = nn.Linear(24, 40).to(torch.bfloat16)
    x = torch.randn(33, 24).to(torch.bfloat16)
    with torch.no_grad():
        want = torch.relu(lin.weight.double() @ x.double().t() + lin.bias.double()[:, None]).t()
        got = bf16.LinearReLU(lin)(x)
    assert got.dtype == torch.bfloat16 and (got >= 0).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("side", [True, False])
def test_the_bf16_mlp_fuses_hidden_relus_but_not_before_a_side_input(side):
    from ctrkit.serving.bf16 import LinearReLU
    mlp = MLP(12, [16, 8], 1, batch_norm=True, side_dim=3 if side else 0)
    _trained_norms(mlp.double(), side=side)
    mlp.float()
    fast = bf16_copy(mlp)
    fused = [i for i, m in enumerate(fast.layers) if isinstance(m, LinearReLU)]
    assert fused == ([3] if side else [0, 3])   # (the side input joins layer 0 before its ReLU)
    assert sum(isinstance(m, nn.ReLU) for m in fast.layers) == (1 if side else 0)
    x, s = torch.randn(40, 12) * 3 + 1, torch.randn(40, 3) * 3 if side else None
    with torch.no_grad():
        want, got = mlp(x, s), fast(x, s)
    err = float((got - want).abs().max())
    assert 0 < err < 0.02 * float(want.abs().max())
