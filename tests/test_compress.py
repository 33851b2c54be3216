"""Gossip compressors: documented contraction bounds hold, the receiver decodes exactly what the
sender assumes (error feedback depends on it), and the byte accounting matches the wire."""
import math

import pytest
import torch

from ctrkit.comm.compress import (Packed, build_compressor, exact_rows_bytes, unpack_dense,
                                  unpack_rows)

SPECS = ["identity", "topk:0.1", "randk:0.1", "int8", "int4", "sign", "fp16", "bf16",
         "topk:0.05+int8", "topk:0.2+int4", "randk:0.25+sign"]
STOCHASTIC = {"randk:0.1", "int8", "int4", "topk:0.05+int8", "topk:0.2+int4", "randk:0.25+sign"}
U, D, NUM_ROWS, N = 300, 16, 1_000_003, 10_000


def _rows_payload(seed: int, u: int = U, d: int = D, num_rows: int = NUM_ROWS):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_rows, generator=g)[:u].sort().values
    # rows of very different norms so that top-k has something to choose
    values = torch.randn(u, d, generator=g) * torch.rand(u, 1, generator=g).pow(3)
    return rows, values


def _dense_payload(seed: int, n: int = N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(3)


def _bits(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


@pytest.mark.parametrize("spec", SPECS)
def test_contraction_bound(spec):
    c = build_compressor(spec)
    seeds = range(20) if spec in STOCHASTIC else range(3)
    slack = 0.03 if spec in STOCHASTIC else 1e-6
    r_rows, r_dense = [], []
    for s in seeds:
        rows, values = _rows_payload(100 + s if spec in STOCHASTIC else s)
        _, rs, vs = c.roundtrip_rows(rows, values, NUM_ROWS, seed=s)
        full = torch.zeros_like(values)
        full[torch.searchsorted(rows, rs)] = vs
        r_rows.append(float((full - values).pow(2).sum() / values.pow(2).sum()))
        x = _dense_payload(100 + s if spec in STOCHASTIC else s)
        _, xs = c.roundtrip_dense(x, seed=s)
        r_dense.append(float((xs - x).pow(2).sum() / x.pow(2).sum()))
    for kind, ratios, width in (("rows", r_rows, D), ("dense", r_dense, N)):
        bound = 1 - c.delta(width)
        got = sum(ratios) / len(ratios) if spec in STOCHASTIC else max(ratios)
        assert got <= bound + slack, (spec, kind, got, bound)
        assert 0 < c.delta(width) <= 1


@pytest.mark.parametrize("spec", SPECS)
def test_roundtrip_exact_and_bytes(spec):
    c = build_compressor(spec)
    for s in range(3):
        rows, values = _rows_payload(s)
        p, rs, vs = c.roundtrip_rows(rows, values, NUM_ROWS, seed=s)
        assert isinstance(p, Packed) and p.data.dtype == torch.uint8 and p.data.dim() == 1
        assert p.data.numel() == p.payload_bytes + p.index_bytes
        assert torch.equal(p.data, c.compress_rows(rows, values, NUM_ROWS, seed=s).data)
        ru, vu = unpack_rows(p.data.clone(), c, D, NUM_ROWS, seed=s)
        assert ru.dtype == torch.int64 and vu.dtype == torch.float32 and vu.shape == (rs.numel(), D)
        assert torch.equal(ru, rs) and torch.equal(vu, vs)
        assert bool((rs[1:] > rs[:-1]).all()) and bool(torch.isin(rs, rows).all())

        x = _dense_payload(s)
        p, xs = c.roundtrip_dense(x, seed=s)
        assert p.data.numel() == p.payload_bytes + p.index_bytes
        assert torch.equal(p.data, c.compress_dense(x, seed=s).data)
        xu = unpack_dense(p.data.clone(), c, N, seed=s)
        assert xu.dtype == torch.float32 and torch.equal(xu, xs)


def test_identity_is_bit_exact_and_sizes_match_exact_rows_bytes():
    c = build_compressor("identity")
    rows, values = _rows_payload(0)
    values[0, 0] = 1e-42  # subnormal survives
    p, rs, vs = c.roundtrip_rows(rows, values, NUM_ROWS, seed=0)
    assert torch.equal(rs, rows) and torch.equal(vs, values)
    assert p.data.numel() == exact_rows_bytes(U, D, NUM_ROWS)
    assert p.payload_bytes == U * D * 4 and p.index_bytes == 4 + math.ceil(U * _bits(NUM_ROWS) / 8)
    x = _dense_payload(0)
    p, xs = c.roundtrip_dense(x, seed=0)
    assert torch.equal(xs, x) and p.payload_bytes == 4 * N and p.index_bytes == 4


@pytest.mark.parametrize("k", [0, 1, 7, 20, 33])
@pytest.mark.parametrize("extra", [0, 1])
def test_index_packing(k, extra):
    num_rows = 2 ** k + extra
    b = _bits(num_rows) if num_rows > 1 else 1
    rows = torch.unique(torch.tensor([0, num_rows // 3, num_rows // 2, num_rows - 1], dtype=torch.int64))
    values = torch.randn(rows.numel(), 3)
    c = build_compressor("identity")
    p = c.compress_rows(rows, values, num_rows, seed=0)
    assert p.index_bytes == 4 + math.ceil(rows.numel() * b / 8)
    ru, vu = unpack_rows(p.data, c, 3, num_rows, seed=0)
    assert torch.equal(ru, rows) and torch.equal(vu, values)


def test_dense_index_bytes():
    x = _dense_payload(1)
    p = build_compressor("topk:0.1").compress_dense(x, seed=0)
    assert p.index_bytes == 4 + math.ceil(1000 * _bits(N) / 8) and p.payload_bytes == 4000
    p = build_compressor("randk:0.1").compress_dense(x, seed=0)   # indices regenerated from the seed
    assert p.index_bytes == 4 and p.payload_bytes == 4000
    # a different seed picks different entries: the seed really drives the selection
    a = unpack_dense(p.data, build_compressor("randk:0.1"), N, seed=0)
    b = unpack_dense(p.data, build_compressor("randk:0.1"), N, seed=1)
    assert not torch.equal(a != 0, b != 0)


def test_payload_sizes_per_coder():
    rows, values = _rows_payload(2)
    size = {s: build_compressor(s).compress_rows(rows, values, NUM_ROWS, seed=0).payload_bytes
            for s in ["int8", "int4", "sign", "fp16", "bf16"]}
    assert size["int4"] == U * D // 2 + 4 * U
    assert size["int8"] == U * D + 4 * U
    assert size["sign"] == U * D // 8 + 4 * U
    assert size["fp16"] == size["bf16"] == 2 * U * D
    x = _dense_payload(2)
    assert build_compressor("int8").compress_dense(x, 0).payload_bytes == N + 4 * math.ceil(N / 256)
    assert build_compressor("int4").compress_dense(x, 0).payload_bytes == N // 2 + 4 * math.ceil(N / 64)
    assert build_compressor("int8:block=128").compress_dense(x, 0).payload_bytes == N + 4 * math.ceil(N / 128)
    # odd counts: the last int4 byte holds one code
    c = build_compressor("topk:0.1+int4")
    p, xs = c.roundtrip_dense(x[:1001], seed=3)
    assert torch.equal(unpack_dense(p.data, c, 1001, seed=3), xs)


def test_quantisers_are_unbiased_and_in_range():
    x = torch.linspace(-1, 1, 64).repeat(400)
    for spec, levels in (("int8", 127), ("int4", 7)):
        c = build_compressor(spec)
        mean = torch.stack([c.roundtrip_dense(x, seed=s)[1] for s in range(200)]).mean(0)
        assert float((mean - x).abs().max()) < 0.3 / levels ** 0.5
        _, xs = c.roundtrip_dense(x, seed=0)
        assert float(xs.abs().max()) <= 1 + 1e-6


def test_fp16_clamps_and_zero_groups():
    c = build_compressor("fp16")
    _, xs = c.roundtrip_dense(torch.tensor([1e6, -1e6, 1.0]), seed=0)
    assert xs.tolist() == [65504.0, -65504.0, 1.0]
    for spec in ["int8", "int4", "sign"]:
        _, rs, vs = build_compressor(spec).roundtrip_rows(torch.arange(4), torch.zeros(4, 8), 10, seed=0)
        assert torch.equal(vs, torch.zeros(4, 8))


def test_wide_rows_get_one_scale_per_block():
    c = build_compressor("int4")          # block 64: a 200-wide row has 4 scales
    rows, values = _rows_payload(3, u=10, d=200)
    p, rs, vs = c.roundtrip_rows(rows, values, NUM_ROWS, seed=0)
    assert p.payload_bytes == 10 * 200 // 2 + 4 * 10 * 4
    assert torch.equal(unpack_rows(p.data, c, 200, NUM_ROWS, seed=0)[1], vs)
    assert c.delta(200) == pytest.approx(1 - 64 / 196) and c.delta(16) == pytest.approx(1 - 16 / 196)


def test_delta_formulas():
    assert build_compressor("identity").delta(16) == 1.0
    assert build_compressor("topk:0.05+int8").delta(16) == pytest.approx(0.05 * (1 - 16 / (4 * 127 ** 2)))
    assert build_compressor("int8").delta(N) == pytest.approx(1 - 256 / (4 * 127 ** 2))
    assert build_compressor("sign").delta(16) == pytest.approx(1 / 16)
    assert build_compressor("sign").delta(N) == pytest.approx(1 / 256)
    assert build_compressor("fp16").delta(16) == 1 - 2 ** -20
    assert build_compressor("bf16").delta(16) == 1 - 2 ** -14
    assert build_compressor("randk:0.25+sign").delta(16) == pytest.approx(0.25 / 16)


@pytest.mark.parametrize("spec", ["foo", "topk:0", "topk:1.5", "topk", "topk:abc", "int4:block=256",
                                  "int8+topk:0.1", "topk:0.1+randk:0.2", "int8+int4", "int8:blok=3",
                                  "int8:block=0", "fp16:2", "topk:0.1+identity", "", "topk:0.1+"])
def test_bad_specs(spec):
    with pytest.raises(ValueError) as e:
        build_compressor(spec)
    msg = str(e.value)
    assert repr(spec) in msg and "\n" not in msg
    if spec == "int4:block=256":
        assert "195" in msg
    if spec == "foo":
        assert "known: topk, randk, identity, fp16, bf16, int8, int4, sign" in msg


def test_good_specs_and_names():
    assert build_compressor("int8:block=128").name == "int8:block=128"
    assert build_compressor(" topk:0.01 + int8 ").name == "topk:0.01+int8"
    assert build_compressor("int4:block=195").delta(1000) > 0
    assert build_compressor("topk:1").delta(5) == 1.0


def test_check():
    c = build_compressor("int4")
    c.check("rows", 16)
    c.check("dense", 10)
    with pytest.raises(ValueError, match="kind"):
        c.check("sparse", 16)
    with pytest.raises(ValueError, match="width"):
        c.check("rows", 0)


@pytest.mark.parametrize("spec", SPECS)
def test_empty_payloads(spec):
    c = build_compressor(spec)
    rows, values = torch.empty(0, dtype=torch.int64), torch.empty(0, D)
    p, rs, vs = c.roundtrip_rows(rows, values, NUM_ROWS, seed=0)
    assert p.data.numel() == p.payload_bytes + p.index_bytes == 4
    ru, vu = unpack_rows(p.data, c, D, NUM_ROWS, seed=0)
    assert ru.shape == (0,) and vu.shape == (0, D) and rs.shape == (0,) and vs.shape == (0, D)
    p, xs = c.roundtrip_dense(torch.empty(0), seed=0)
    assert unpack_dense(p.data, c, 0, seed=0).shape == (0,) == xs.shape


def test_mismatched_message_is_rejected():
    rows, values = _rows_payload(0)
    p = build_compressor("int8").compress_rows(rows, values, NUM_ROWS, seed=0)
    with pytest.raises(ValueError, match="does not match"):
        unpack_rows(p.data, build_compressor("int4"), D, NUM_ROWS, seed=0)
    with pytest.raises(ValueError, match="sorted and in"):
        build_compressor("int8").compress_rows(rows, values, 5, seed=0)


def test_a_registered_coder_is_used_by_name_and_validated_by_the_config():
    from ctrkit.comm.compress import CODERS, Coder
    from ctrkit.config import load_config

    class Fixed64(Coder):
        """A toy plug-in coder: values rounded to 1/64, sent as int16 (2 bytes each)."""
        name = spec = "fixed64"

        def delta(self, width):
            return 0.5   # (a bound for the test's values, |x| >> 1/64)

        def nbytes(self, r, w):
            return 2 * r * w

        def encode(self, x, seed):
            return torch.round(x * 64).to(torch.int16).contiguous().view(torch.uint8).reshape(-1)

        def decode(self, buf, r, w):
            return buf.clone().view(torch.int16).to(torch.float32).reshape(r, w) / 64

    @CODERS.register("fixed64")
    def _fixed64(spec, name, arg):
        if arg:
            raise ValueError(f"compressor {spec!r}: fixed64 takes no options")
        return Fixed64()
    try:
        c = build_compressor("topk:0.5+fixed64")
        assert c.name == "topk:0.5+fixed64"
        rows, values = _rows_payload(0)
        values = values * 100
        packed, r, v = c.roundtrip_rows(rows, values, NUM_ROWS, seed=0)
        assert packed.data.numel() == 4 + math.ceil(r.numel() * _bits(NUM_ROWS) / 8) + 2 * r.numel() * D
        r2, v2 = unpack_rows(packed.data, c, D, NUM_ROWS, seed=0)
        assert torch.equal(r2, r) and torch.equal(v2, v)
        keep = torch.searchsorted(rows, r)
        assert torch.allclose(v, torch.round(values[keep] * 64) / 64)
        cfg = load_config(None, ["distributed.compressor=topk:0.01+fixed64"])
        assert cfg.distributed.compressor == "topk:0.01+fixed64"
        with pytest.raises(Exception, match="fixed64 takes no options"):
            load_config(None, ["distributed.compressor=fixed64:3"])
    finally:
        CODERS.unregister("fixed64")
    with pytest.raises(ValueError, match="unknown name 'fixed64'"):
        build_compressor("topk:0.5+fixed64")
