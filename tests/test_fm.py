"""The FM term against its definition, sum over field pairs i < j of <e_i, e_j>, in float64."""
import torch

from ctrkit.models.layers import fm_interaction


def _pairwise(emb: torch.Tensor) -> torch.Tensor:
    b, f, _ = emb.shape
    out = torch.zeros(b, dtype=emb.dtype)
    for i in range(f):
        for j in range(i + 1, f):
            out = out + (emb[:, i] * emb[:, j]).sum(1)
    return out


def test_fm_term_and_its_gradient_equal_the_pairwise_sum():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ref = emb.detach().clone().requires_grad_()
    weights = torch.randn(7, generator=g, dtype=torch.float64)
    got, want = fm_interaction(emb), _pairwise(ref)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(emb.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_fm_term_in_float32_is_close_to_float64():
    emb = torch.randn(64, 39, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    want = _pairwise(emb.double())
    torch.testing.assert_close(fm_interaction(emb).double(), want, rtol=1e-5, atol=1e-5)
