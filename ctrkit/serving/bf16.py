"""The bfloat16 scoring copy of a model (`bf16_copy(model)`), and batch norm folded into the
linear layer before it (`fold_batch_norms(model)`).

`bf16_copy` folds the norms, then runs each of ctrkit's MLPs whole in bfloat16 (weights
converted once; the input cast on the way in, the output cast back to float32 on the way out;
each hidden Linear + ReLU as one fused oneDNN call, `LinearReLU`, where torch has the kernel)
and every other `nn.Linear` of more than one output in bfloat16 the same way. The embedding
tables (shared with the original, not copied), the FM and first-order terms and the sigmoid stay
float32: bf16 would lose the FM term's cancelling sums, and a gather gains nothing from it.
Where the CPU has bf16 units (AVX-512 BF16, AMX) the matrix products run several times faster;
the scores move by ~2e-3 (bench/RESULTS.md "Serving"). (torch.autocast was slower: it runs
batch norm in float32, so each layer's output went bf16 -> fp32 -> bf16, and it cast the FM's
vecdot to bf16 too.)

In eval mode `BatchNorm1d(Wx + b)` is the affine map k * (Wx + b - mean) + beta with
k = gamma / sqrt(running_var + eps): one linear layer with weight k * W and bias
k * (b - mean) + beta. Folding removes a pass over every hidden activation, and lets the MLP
stay in bf16 from its input to its output. Folding rounds differently from the norm, by ~1e-7
relative in float32, so `predict`'s exact fp32 path does not fold; its bf16 path does.

Only ctrkit's `MLP` (models/layers.py, the zoo's deep part) is folded, including the weight of
its side input (dense features entering the first layer on their own); other modules are left as
they are.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ctrkit.models.embedding import TableModule
from ctrkit.models.layers import MLP


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode whose MLPs have each Linear -> BatchNorm1d pair folded into
    the Linear (the norm becomes an identity); `model` itself is not changed."""
    # (the tables are shared, not copied: nothing here changes them, and they are most of it)
    tables = {id(m): m for m in model.modules() if isinstance(m, TableModule)}
    folded = copy.deepcopy(model, memo=tables).eval()
    for m in folded.modules():
        if isinstance(m, MLP):
            _fold_mlp(m)
    return folded


@torch.no_grad()
def _fold_mlp(mlp: MLP) -> None:
    layers = mlp.layers
    for i in range(len(layers) - 1):
        lin, bn = layers[i], layers[i + 1]
        if not (isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
                and bn.track_running_stats):
            continue
        var, mean = bn.running_var.double(), bn.running_mean.double()
        k = 1.0 / torch.sqrt(var + bn.eps)
        shift = -mean * k
        if bn.affine:
            k, shift = k * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
        bias = lin.bias.double() if lin.bias is not None else torch.zeros_like(k)
        weights = [lin.weight] + ([mlp.side.weight] if i == 0 and mlp.side is not None else [])
        for w in weights:   # (the side input's weight feeds the same norm)
            w.copy_(w.double() * k[:, None])
        new_bias = bias * k + shift
        if lin.bias is None:
            lin.bias = nn.Parameter(new_bias.to(lin.weight.dtype))
        else:
            lin.bias.copy_(new_bias)
        layers[i + 1] = nn.Identity()


def bf16_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` for bf16 scoring, as described above; `model` is not changed."""
    fast = fold_batch_norms(model)
    inside = set()
    for m in fast.modules():
        if isinstance(m, MLP):
            _fuse_relus(m)
            _in_bf16(m)
            inside.update(id(x) for x in m.modules())
    for m in fast.modules():   # (a layer of one output, a logit term, stays float32)
        if isinstance(m, nn.Linear) and id(m) not in inside and m.out_features > 1:
            _in_bf16(m)
    return fast


def _in_bf16(module: nn.Module) -> None:
    """`module`'s parameters in bfloat16, its float inputs cast to it, its output back to float32."""
    module.to(torch.bfloat16)
    module.register_forward_pre_hook(lambda m, args: tuple(
        a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        for a in args))
    module.register_forward_hook(lambda m, args, out: out.float())


class LinearReLU(nn.Module):
    """relu(linear(x)) in one oneDNN call (the ReLU applied as the product is written out) where
    torch has the fused kernel, else a linear layer and an in-place ReLU. In bfloat16 here the
    separate ReLU took as long as a third of the matrix product."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the fused op has no backward: it is used only where no gradient is wanted)
        if x.dtype == torch.bfloat16 and x.dim() == 2 and not torch.is_grad_enabled():
            op = _fused_kernel()
            if op is not None:
                return op(x, self.weight, self.bias, "relu", [], "")
        return F.linear(x, self.weight, self.bias).relu_()


@functools.lru_cache(maxsize=None)
def _fused_kernel():
    """oneDNN's fused linear + pointwise op (what torch.compile's CPU backend calls), if this
    torch build has it and it runs in bfloat16 here (probed once, on first use)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        x, w = torch.ones(2, 3, dtype=torch.bfloat16), -torch.ones(4, 3, dtype=torch.bfloat16)
        out = op(x, w, torch.zeros(4, dtype=torch.bfloat16), "relu", [], "")
        return op if out.shape == (2, 4) and not out.any() else None
    except (AttributeError, RuntimeError):
        return None


def _fuse_relus(mlp: MLP) -> None:
    """Each hidden Linear -> [Identity (a folded norm)] -> ReLU of `mlp` as one LinearReLU.
    (The first layer stays as it is when the MLP has a side input, added before its ReLU.)"""
    layers = mlp.layers
    start = 1 if mlp.side is not None else 0
    for i in range(start, len(layers) - 1):
        if not isinstance(layers[i], nn.Linear):
            continue
        j = i + 1
        while j < len(layers) and isinstance(layers[j], nn.Identity):
            j += 1
        if j < len(layers) and isinstance(layers[j], nn.ReLU):
            layers[i] = LinearReLU(layers[i])
            layers[j] = nn.Identity()
