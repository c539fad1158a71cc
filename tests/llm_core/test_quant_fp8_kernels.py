"""The FP8 Triton kernels (`layers/fp8_kernels.py`) against `fp8_ops`' reference, on CPU under
TRITON_INTERPRET=1 (`interpreted.py`; the interpreter reads and writes E4M3 but has no FP8
dot, so the GEMM's dots run in fp32 there: the same products). Per-channel and 128x128 block
weights, partial row / feature / K tiles, split-K, bias."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.layers import fp8_gemv, fp8_kernels
from polymodal.llm_core.quantization import fp8_ops
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


def exact_x(rows: int, k: int, dtype, group: int | None = None, seed: int = 0):
    """Activations whose quantization is exact: FP8 values times a power of two, every row (or
    128-feature group) reaching +-448. The interpreter's fp32 -> E4M3 cast rounds values just
    under a power of two down a whole binade (124.6 -> 64; compiled kernels and torch give
    128), so interpreted tests keep x on the grid, where no rounding happens; the GPU tests
    (`test_quant_gpu.py`) check the rounding itself."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(rows, k, generator=gen) * 100).clamp(-440, 440).to(fp8_ops.FP8).float()
    span = group or k
    q.view(rows, k // span, span)[:, :, 0] = 448.0  # the amax of each row / group
    return (q * 2.0**-9).to(dtype)


def _weights(n, k, strategy, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    return fp8_ops.quantize_weight(w, strategy)


@pytest.mark.parametrize("one_pass_max", [fp8_kernels.ONE_PASS_MAX, 0])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("k", [384, 2560])
def test_quantize_rows_equals_reference(group, k, one_pass_max, monkeypatch):
    """Both forms: the row (group) read once, whole, and the two passes of 1024-feature loads
    (K 2560: three loads, the last partial; a row's amax placed in its last load)."""
    monkeypatch.setattr(fp8_kernels, "ONE_PASS_MAX", one_pass_max)
    x = exact_x(5, k, torch.bfloat16, group)
    x[2] = 0  # an all-zero row: the minimum scale, zeros out
    if group is None:  # row 3's amax in its last features (the last, partial load)
        x[3, 0], x[3, -1] = x[3, 1], -448.0 * 2.0**-9
    xq, xs = fp8_kernels.quantize_rows(x, group)
    ref_q, ref_s = fp8_ops.quantize_per_token(x, group)
    torch.testing.assert_close(xs, ref_s.reshape(xs.shape), rtol=0, atol=0)
    assert torch.equal(xq.float(), ref_q.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["channel", "block"])
@pytest.mark.parametrize("rows", [2, 17])
@pytest.mark.parametrize("split_k", [1, 3])
def test_fp8_gemm(dtype, strategy, rows, split_k):
    """N=200 (a partial 128-row scale block and 16-feature tiles), K=384 (three scale blocks;
    split 3: one K tile a split, the bias in split 0's plane only)."""
    n, k = 200, 384
    weight, scale = _weights(n, k, strategy)
    gen = torch.Generator().manual_seed(rows)
    block = 128 if strategy == "block" else None
    x = exact_x(rows, k, dtype, block, seed=rows)
    bias = torch.randn(n, generator=gen).to(dtype)
    ref = fp8_ops.w8a8_reference(x.float(), weight, scale, block, bias.float())
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": split_k}
    out = fp8_kernels.fp8_gemm(x, weight, scale, block, bias, config=config)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strategy", ["channel", "block"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_fp8_gemv(dtype, strategy, rows, split_k):
    """x quantized inside the kernel (per row, or per 128-feature tile for block weights):
    the same numbers as quantize_rows + the GEMM. N=37 in blocks of 16 (one partial, its rows
    past N reading row N - 1), K=384 (3 tiles of 128: split 4 leaves a split empty); each call
    twice (counters reset)."""
    n, k = 37, 384
    weight, scale = _weights(n, k, strategy, seed=split_k)
    gen = torch.Generator().manual_seed(rows + 7)
    block = 128 if strategy == "block" else None
    x = exact_x(rows, k, dtype, block, seed=rows + 7)
    bias = torch.randn(n, generator=gen).to(dtype)
    ref = fp8_ops.w8a8_reference(x.float(), weight, scale, block, bias.float())
    for _ in range(2):
        out = fp8_gemv.fp8_gemv(x, weight, scale, block, bias, config=(16, 128, split_k))
        assert out.shape == (rows, n) and out.dtype == dtype
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("rows", [1, 2])
def test_fp8_gemv_amax_over_several_loads(rows):
    """A row longer than `AMAX_BLOCK` (a 7B's down_proj K is 18944): the scale comes from the
    amax over every load of the row, here placed in its last, partial one."""
    n, k = 9, fp8_gemv.AMAX_BLOCK * 2 + 384
    weight, scale = _weights(n, k, "channel", seed=3)
    x = exact_x(rows, k, torch.float32, seed=5)
    x[:, 0] = x[:, 1]  # exact_x's amax (448) moves from feature 0 to the last load
    x[:, -7] = 448.0 * 2.0**-9
    ref = fp8_ops.w8a8_reference(x, weight, scale, None)
    out = fp8_gemv.fp8_gemv(x, weight, scale, None, config=(16, 512, 2))
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize(("block_k", "split_k"), [(256, 1), (256, 2), (512, 1), (512, 2)])
def test_fp8_gemv_block_groups_in_columns(block_k, split_k):
    """One row, block weights, BLOCK_K = 2 or 4 scale blocks: each 128-feature group of a tile
    is its own column of the dot with its own scales. K=384 (3 groups): the last tile is
    partial (a group, or two, past K), and split 2 of one 512-tile leaves a split empty."""
    n, k = 37, 384
    weight, scale = _weights(n, k, "block", seed=block_k)
    x = exact_x(1, k, torch.bfloat16, 128, seed=split_k)
    x[0, 128:256] *= 2.0**-6  # groups of different scales
    bias = torch.randn(n, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    ref = fp8_ops.w8a8_reference(x.float(), weight, scale, 128, bias.float())
    out = fp8_gemv.fp8_gemv(x, weight, scale, 128, bias, config=(16, block_k, split_k))
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize(
    ("rows", "config"), [(1, (16, 192, 1)), (1, (256, 128, 1)), (2, (16, 256, 1))]
)
def test_fp8_gemv_block_tiles_must_fit_the_blocks(rows, config):
    """Block weights: BLOCK_K whole blocks (one only for several rows: a column is a row
    then), BLOCK_N rows within one block."""
    weight, scale = _weights(256, 384, "block")
    x = exact_x(rows, 384, torch.bfloat16, 128)
    with pytest.raises(ValueError, match="128-blocks"):
        fp8_gemv.fp8_gemv(x, weight, scale, 128, config=config)


@pytest.mark.parametrize("strategy", ["channel", "block"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_fp8_gemv_folds_residual_norm_and_silu(strategy, split_k):
    """One row, the decode folds of the 16-bit GEMV: `residual` returns h = out + residual
    (rounded as torch adds) with per-block sums of h^2; `DeferredNorm(h)` quantizes and
    multiplies the reference RMSNorm of h (its scale from the normalized row); `silu_mul`
    the reference SiLU*mul. Each against quantize_rows + the reference product of that x."""
    from polymodal.llm_core.layers import triton_ops
    from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

    dtype = torch.float32  # the interpreter's fp32 -> E4M3 cast is exact on exact_x's grid
    block = 128 if strategy == "block" else None
    weight, scale = _weights(40, 256, strategy, seed=split_k)
    x = exact_x(1, 256, dtype, block, seed=3)
    residual = torch.randn(1, 40, generator=torch.Generator().manual_seed(4))
    config = (16, 128, split_k)  # 3 feature blocks
    added = fp8_gemv.fp8_gemv(x, weight, scale, block, config=config, residual=residual)
    assert isinstance(added, AddedResidual) and added.sumsq.shape == (1, 3)
    out = fp8_ops.w8a8_reference(x, weight, scale, block)
    assert_close(added.h, out + residual, dtype)
    blocks = torch.stack([(added.h[:, i : i + 16] ** 2).sum(1) for i in (0, 16, 32)], 1)
    torch.testing.assert_close(added.sumsq, blocks, rtol=1e-5, atol=1e-5)

    h = exact_x(1, 256, dtype, block, seed=5) * 3.0
    sumsq = torch.stack([(h[:, i : i + 64] ** 2).sum(1) for i in range(0, 256, 64)], 1)
    norm_w = torch.full((256,), 0.5)  # powers of two keep the normalized row on the grid
    deferred = DeferredNorm(h, sumsq, norm_w, 0.0)
    normed = triton_ops.rms_norm_ref(h, norm_w, 0.0)[0]
    y = fp8_gemv.fp8_gemv(deferred, weight, scale, block, config=config)
    torch.testing.assert_close(y, fp8_ops.w8a8_reference(normed, weight, scale, block),
                               rtol=2e-2, atol=2e-2)  # fmt: skip
    gate_up = torch.cat([torch.full((1, 256), 30.0), exact_x(1, 256, dtype, block, seed=6)], 1)
    act = triton_ops.silu_and_mul_ref(gate_up)  # silu(30) = 30 in fp32: x * 30
    y = fp8_gemv.fp8_gemv(gate_up, weight, scale, block, config=config, silu_mul=True)
    torch.testing.assert_close(y, fp8_ops.w8a8_reference(act, weight, scale, block),
                               rtol=2e-5, atol=2e-5)  # fmt: skip
