"""The INT4 Triton kernels (`layers/int4_gemv.py`, `layers/int4_kernels.py`) against the
dequantized reference, on CPU under TRITON_INTERPRET=1 (`interpreted.py`): partial feature
blocks, several groups per K, act-order permutations, split-K, bias, 1-4 rows (GEMV) and odd
row counts (GEMM), K tiles narrower than a group and a last partial group, the scales' range;
the dense path's dequantization bit for bit, and `Int4LinearMethod`'s choice of kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import int4_gemv, int4_kernels
from polymodal.llm_core.quantization import int4_pack
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


def make_int4(n: int, k: int, group: int, act_order: bool, seed: int = 0):
    """Random INT4 tensors in the kernels' layout and the fp32 weight `[N, K]` they stand for
    (in x's feature order)."""
    gen = torch.Generator().manual_seed(seed)
    g_idx = int4_pack.act_order_g_idx(k, group, gen) if act_order else None
    q, zeros, scales = int4_pack.quantize_rtn(torch.randn(n, k, generator=gen), group, g_idx)
    weight = int4_pack.dequantize(q, zeros, scales, g_idx)
    perm = None
    if act_order:  # as Int4LinearMethod.process_weights sorts the rows by group
        perm = torch.argsort(g_idx.long(), stable=True)
        q = q[perm]
        perm = perm.to(torch.int32)
    return int4_pack.pack_k(q), zeros.to(torch.uint8), scales, perm, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("prefetch", "stages"), [(False, 1), (True, 1), (False, 3)])
def test_int4_gemv(dtype, rows, split_k, act_order, prefetch, stages):
    """N=40 in 32-feature blocks (one partial), K=96 in groups of 32 (3 tiles: split 2 gets
    2 + 1, split 3 one tile a program, all of it loaded before the PDL wait, split 4 leaves
    one split empty); each call twice (the arrival counters reset); with the next tile's loads
    issued a tile ahead, or the K loop pipelined through shared memory (stages 3), or neither."""
    qweight, zeros, scales, perm, weight = make_int4(40, 96, 32, act_order, rows + split_k)
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 96, generator=gen) / 96**0.5).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    ref = F.linear(x.float(), weight, bias.float())
    config = (32, 32, split_k, 4, prefetch, stages)
    if prefetch and rows > 1:
        with pytest.raises(ValueError, match="prefetch is for one row"):
            int4_gemv.int4_gemv(x, qweight, zeros, scales, 32, perm, bias, config=config)
        return
    for _ in range(2):
        out = int4_gemv.int4_gemv(x, qweight, zeros, scales, 32, perm, bias, config=config)
        assert out.shape == (rows, 40) and out.dtype == dtype
        assert_close(out, ref, dtype)


def test_int4_gemv_prefetch_and_stages_exclude():
    qweight, zeros, scales, _, _ = make_int4(40, 96, 32, False, 0)
    x = torch.randn(1, 96)
    with pytest.raises(ValueError, match="exclude"):
        int4_gemv.int4_gemv(x, qweight, zeros, scales, 32, config=(32, 32, 1, 4, True, 3))


@pytest.mark.parametrize(
    ("group", "k", "config"),
    [
        (16, 80, (64, 16, 2, 4)),  # 5 one-group tiles; 64 features = two 32-wide sub-tiles
        (64, 160, (32, 32, 2, 4)),  # two tiles per group; the last group (32) half a group
        (128, 192, (16, 64, 1, 2)),  # 16 features (one sub-tile narrower than 32)
    ],
)
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_gemv_groups_and_tiles(group, k, config, rows):
    """Tiles narrower than the group (several per group), a last group shorter than the
    others (GPTQ allows K % group != 0), feature blocks of several sub-tiles; x spans
    magnitudes from 2^-20 to 2^20 (the kernel scales it by up to 2^100 around denormal
    nibbles) and holds exact zeros."""
    n = 72
    gen = torch.Generator().manual_seed(group + rows)
    q = torch.randint(0, 16, (n, k), generator=gen)
    groups = -(-k // group)
    zeros = torch.randint(0, 16, (groups, n), generator=gen)
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.001
    idx = torch.arange(k) // group
    weight = (q - zeros.t()[:, idx]).float() * scales.t()[:, idx]  # [N, K]
    x = torch.randn(rows, k, generator=gen) * 2.0 ** torch.randint(
        -20, 21, (rows, k), generator=gen
    )
    x[:, ::7] = 0.0
    out = int4_gemv.int4_gemv(
        x, int4_pack.pack_k(q.t().contiguous()), zeros.to(torch.uint8), scales, group,
        config=config,
    )  # fmt: skip
    ref = F.linear(x.double(), weight.double()).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def random_int4(n: int, k: int, group: int, gen, scale_exps=(-10, -4)):
    """Random codes, zeros (0-16: GPTQ v1 reads a stored 15 as 16) and fp16 scales 2^e
    (1 + u), e in `scale_exps`, for K % group != 0 too: (qweight, zeros, scales, fp32 weight
    [N, K], g_idx)."""
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    groups = -(-k // group)
    zeros = torch.randint(0, 17, (groups, n), generator=gen, dtype=torch.int32)
    exps = torch.randint(scale_exps[0], scale_exps[1] + 1, (groups, n), generator=gen)
    scales = ((1 + torch.rand(groups, n, generator=gen)) * 2.0**exps).half()
    g_idx = torch.arange(k) // group
    weight = int4_pack.dequantize(q, zeros, scales, g_idx)
    return int4_pack.pack_k(q), zeros.to(torch.uint8), scales, weight, g_idx


def bf16_interpreted(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 as the interpreter casts: truncated (a GPU rounds to nearest even)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def rounded(weight: torch.Tensor, dtype) -> torch.Tensor:
    """The fp32 weight in `dtype` as the interpreted kernels round it."""
    return bf16_interpreted(weight) if dtype == torch.bfloat16 else weight.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [9, 33])
@pytest.mark.parametrize("group", [16, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gemm(dtype, rows, group, act_order):
    """M = 9 / 33 rows in 16-row tiles, N=40 in 16-feature tiles, K=256 in groups of 16-128:
    the weight tile dequantized to x's dtype before the dot (the reference rounds it the same
    way); bf16 and fp32 dots carry the weight times 2^-38, fp16 scales it back first."""
    qweight, zeros, scales, perm, weight = make_int4(40, 256, group, act_order, rows)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(rows, 256, generator=gen) / 256**0.5).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    ref = F.linear(x.float(), rounded(weight, dtype).float(), bias.float())
    out = int4_kernels.int4_gemm(x, qweight, zeros, scales, group, perm, bias)
    assert out.shape == (rows, 40) and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    ("group", "k", "config"),
    [
        (64, 200, (16, 16, 32, 4, 1)),  # groups 64, 64, 64, 8: the last tile 8 features
        (64, 136, (16, 32, 16, 4, 1)),  # 4 tiles a group; the last group one tile
        (128, 384, (32, 16, 128, 4, 1)),  # one 128-feature tile a group
        (16, 80, (16, 16, 16, 4, 1)),  # 5 groups of one tile
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_gemm_tiles_groups_and_scale_range(group, k, config, dtype):
    """K tiles narrower than the group, a last group shorter than the others (GPTQ allows
    K % group != 0), 13 rows in partial row tiles; zeros up to 16 and fp16 scales from 2^-24
    to 2^15 (the 2^-38 denormal products stay exact), x from 2^-20 to 2^20: fp32 outputs
    within float64 rounding of the exact products, fp16 within its weight rounding."""
    n, rows = 24, 13
    gen = torch.Generator().manual_seed(group + k)
    qweight, zeros, scales, weight, _ = random_int4(n, k, group, gen, (-24, 14))
    x = torch.randn(rows, k, generator=gen) * 2.0 ** torch.randint(
        -20, 21, (rows, k), generator=gen
    )
    x[:, ::7] = 0.0
    if dtype == torch.float16:  # fp16 inputs: products in range, weights rounded to fp16
        scales = scales.clamp(max=2.0**-4)
        weight = int4_pack.dequantize(int4_pack.unpack_k(qweight), zeros, scales,
                                      torch.arange(k) // group).to(dtype).float()  # fmt: skip
        x = (torch.randn(rows, k, generator=gen) / k**0.5).to(dtype)
    out = int4_kernels.int4_gemm(x, qweight, zeros, scales, group, config=config)
    ref = F.linear(x.double(), weight.double())
    atol = (1e-5 if dtype == torch.float32 else 2e-3) * ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=atol)


def test_int4_gemm_rejects_a_tile_across_groups():
    qweight, zeros, scales, _, _ = random_int4(16, 96, 32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="BLOCK_K 64 must divide the group"):
        int4_kernels.int4_gemm(torch.randn(5, 96), qweight, zeros, scales, 32,
                               config=(16, 16, 64, 4, 1))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("group", "k", "act_order"),
    [(16, 96, False), (64, 200, False), (32, 128, True), (64, 256, True)],
)
def test_int4_dequantize_equals_the_reference(dtype, group, k, act_order):
    """The dense weight `[K, N]` equals `int4_pack.dequantize` rounded once to the dtype, bit
    for bit (bf16: as the interpreter casts; the GPU test compares torch's rounding); act
    order: row perm[j] holds sorted row j, i.e. x's feature order."""
    n = 40
    gen = torch.Generator().manual_seed(k + group)
    qweight, zeros, scales, weight, g_idx = random_int4(n, k, group, gen)
    perm = None
    if act_order:  # the checkpoint's g_idx, sorted on load as process_weights does
        g_idx = int4_pack.act_order_g_idx(k, group, gen)
        q = int4_pack.unpack_k(qweight)
        weight = int4_pack.dequantize(q, zeros.int(), scales, g_idx)  # [N, K], x's order
        perm = torch.argsort(g_idx.long(), stable=True)
        qweight, perm = int4_pack.pack_k(q[perm]), perm.to(torch.int32)
    out = int4_kernels.int4_dequantize(qweight, zeros, scales, group, perm, dtype)
    assert out.shape == (k, n) and out.dtype == dtype
    assert torch.equal(out, rounded(weight.t(), dtype))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_dequantized(act_order, dtype):
    """The dense path (dequantize + torch.matmul / addmm) with bias, against the reference."""
    qweight, zeros, scales, perm, weight = make_int4(48, 128, 32, act_order, 7)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(21, 128, generator=gen) / 128**0.5).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    ref = F.linear(x.float(), rounded(weight, dtype).float(), bias.float())
    out = int4_kernels.int4_matmul_dequantized(x, qweight, zeros, scales, 32, perm, bias)
    assert out.shape == (21, 48) and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("fmt", ["awq", "gptq-act-order"])
def test_int4_linear_method_kernels_per_row_count(fmt):
    """`Int4LinearMethod`'s CUDA dispatch (`int4_kernel`): GEMV to 4 rows, the GEMM to
    INT4_DENSE_MIN_ROWS - 1, dequantize + matmul from there; each, fed the layer's processed
    tensors (perm, zeros, bias), matches the layer's CPU reference path."""
    from polymodal.llm_core.layers.linear import Linear
    from polymodal.llm_core.quantization import int4
    from polymodal.llm_core.quantization.int4 import Int4LinearMethod, Int4Scheme, int4_kernel

    assert int4_kernel(4) is int4_gemv.int4_gemv
    assert int4_kernel(5) is int4_kernels.int4_gemm
    assert int4_kernel(int4.INT4_DENSE_MIN_ROWS - 1) is int4_kernels.int4_gemm
    assert int4_kernel(int4.INT4_DENSE_MIN_ROWS) is int4_kernels.int4_matmul_dequantized
    k, n, group = 128, 48, 32
    act_order = fmt != "awq"
    scheme = Int4Scheme("awq" if fmt == "awq" else "gptq", group, desc_act=act_order)
    method = Int4LinearMethod(scheme)
    layer = Linear(k, n, bias=True, method=method)
    gen = torch.Generator().manual_seed(5)
    g_idx = int4_pack.act_order_g_idx(k, group, gen) if act_order else None
    q, zeros, scales = int4_pack.quantize_rtn(torch.randn(n, k, generator=gen), group, g_idx)
    if fmt == "awq":
        layer.qweight.data, layer.qzeros.data = int4_pack.pack_awq(q, zeros)
    else:
        layer.qweight.data, layer.qzeros.data = int4_pack.pack_gptq(q, zeros)
        layer.g_idx.data = g_idx
    layer.scales.data = scales
    layer.bias.data = torch.randn(n, generator=gen)
    method.process_weights(layer)
    x = torch.randn(6, k, generator=gen) / k**0.5
    ref = method.apply(layer, x)  # CPU: F.linear with the dequantized weight
    for rows in (4, 5, int4.INT4_DENSE_MIN_ROWS):
        kernel = int4_kernel(rows)
        out = kernel(x[:4] if rows == 4 else x, layer.qweight, layer.zeros, layer.scales, group,
                     layer.perm, layer.bias)  # fmt: skip
        assert_close(out, ref[: out.shape[0]], torch.float32)


def test_gemv_config_keeps_one_group_per_tile():
    for group in (32, 64, 128, 256, 4096):
        _, block_k, *_ = int4_gemv.gemv_config(1, 4096, 4096, group, 132)
        assert group % block_k == 0 and block_k % 8 == 0


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_gemv_residual_then_deferred_norm_then_silu(rows, split_k):
    """The decode folds of the 16-bit GEMV in the INT4 one (bf16): given `residual` it returns
    h = out + residual (rounded as torch adds) with per-feature-block sums of h^2; given
    `DeferredNorm(h)` it equals the product of the reference RMSNorm of h; with `silu_mul` it
    equals `silu_and_mul` then the product. K = 64, groups of 32."""
    from polymodal.llm_core.layers import triton_ops
    from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(rows + 10 * split_k)
    q1, z1, s1, _, w1 = make_int4(72, 64, 32, False, seed=rows)  # 72 = 2 blocks of 64 + 8
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    residual = torch.randn(rows, 72, generator=gen).to(dtype)
    config = (64, 32, split_k)
    for _ in range(2):  # the split-K counters are reset
        added = int4_gemv.int4_gemv(x, q1, z1, s1, 32, config=config, residual=residual)
        assert isinstance(added, AddedResidual) and added.sumsq.shape == (rows, 2)
        out = F.linear(x.float(), w1).to(dtype)
        assert_close(added.h, (out.float() + residual.float()).to(dtype), dtype)
        h = added.h.float()
        blocks = torch.stack([(h[:, i : i + 64] ** 2).sum(1) for i in (0, 64)], 1)
        torch.testing.assert_close(added.sumsq, blocks, rtol=1e-4, atol=1e-4)
    norm_w = (1 + 0.1 * torch.randn(72, generator=gen)).to(dtype)
    q2, z2, s2, perm, w2 = make_int4(40, 72, 8, True, seed=5)  # act order: norm weight permuted
    deferred = DeferredNorm(added.h, added.sumsq, norm_w, 1e-6)
    y = int4_gemv.int4_gemv(deferred, q2, z2, s2, 8, perm, config=(32, 8, split_k))
    normed = triton_ops.rms_norm_ref(added.h, norm_w, 1e-6)[0]
    close_to_scale(y, F.linear(normed.float(), w2))
    gate_up = torch.randn(rows, 2 * 64, generator=gen).to(dtype)
    y = int4_gemv.int4_gemv(gate_up, q1, z1, s1, 32, config=config, silu_mul=True)
    act = triton_ops.silu_and_mul_ref(gate_up)
    close_to_scale(y, F.linear(act.float(), w1))


def close_to_scale(out, ref):
    """bf16 outputs of unit-scale INT4 weights (sums of ~8 magnitude): within 3% of the output's
    scale (the interpreter truncates to bf16 where the reference rounds)."""
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
