"""The 16-bit GEMV streaming E4M3 weights with per-channel scales (`gemv.gemv(w_scale=)`, FP8
batch-1 decode: W8A16) against F.linear of the dequantized weight, its folds, its launch
config and its bad inputs, on CPU under TRITON_INTERPRET=1 (`interpreted.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import gemv as gemv_ops
from polymodal.llm_core.layers import gemv_config, triton_ops
from polymodal.llm_core.quantization import fp8_ops
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


def fp8_weight(n: int, k: int, gen: torch.Generator):
    """(E4M3 weight [n, k], fp32 scales [n, 1]) of a random weight, per channel."""
    return fp8_ops.quantize_weight(torch.randn(n, k, generator=gen) / k**0.5, "channel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("fma2d", [True, False])
def test_fp8_weights_times_their_scales(dtype, rows, split_k, silu_mul, fma2d):
    """N=37, K=83 in 16 x 32 tiles (a partial feature block, a partial last K tile, an empty
    split at 4): x as it is (not quantized) times the dequantized weight, plus the bias; one
    row through the 2-D accumulator (or the per-row sums: `fma2d=False`), 3 rows through the
    per-row sums. Each call twice (the split counters reset)."""
    gen = torch.Generator().manual_seed(10 * rows + split_k + 100 * silu_mul)
    x = torch.randn(rows, 83 * (1 + silu_mul), generator=gen).to(dtype)
    weight, scale = fp8_weight(37, 83, gen)
    bias = torch.randn(37, generator=gen).to(dtype)
    config = gemv_ops.GemvConfig(block_n=16, block_k=32, split_k=split_k, fma2d=fma2d)
    rows_in = triton_ops.silu_and_mul_ref(x) if silu_mul else x
    deq = fp8_ops.dequantize_weight(weight, scale)
    ref = F.linear(rows_in.float(), deq, bias.float())
    for _ in range(2):
        out = gemv_ops.gemv(x, weight, bias, config, silu_mul=silu_mul, w_scale=scale)
        assert out.shape == (rows, 37) and out.dtype == dtype
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("split_k,block_k", [(1, 32), (2, 32), (1, 128)])
def test_fp8_weights_take_the_norm_and_residual_folds(split_k, block_k):
    """One bf16 row: a deferred RMSNorm on load and the residual add in the epilogue with the
    blocks' sums of squares, as the 16-bit weights take them; in 32-wide K tiles, or all of
    K (83) in one 128-wide tile summed per row, as the one-row defaults take a K up to
    `ONE_TILE_MAX_K`."""
    from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

    dtype, gen = torch.bfloat16, torch.Generator().manual_seed(7 + split_k)
    h = torch.randn(1, 83, generator=gen).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(83, generator=gen)).to(dtype)
    sumsq = (h.float() ** 2).sum(1, keepdim=True)
    weight, scale = fp8_weight(37, 83, gen)
    residual = torch.randn(1, 37, generator=gen).to(dtype)
    config = gemv_ops.GemvConfig(block_n=8, block_k=block_k, split_k=split_k, fma2d=block_k < 83)
    added = gemv_ops.gemv(DeferredNorm(h, sumsq, norm_w, 1e-6), weight, None, config,
                          residual=residual, w_scale=scale)  # fmt: skip
    assert isinstance(added, AddedResidual) and added.sumsq.shape == (1, 5)
    normed = triton_ops.rms_norm_ref(h, norm_w, 1e-6)[0]
    out = F.linear(normed.float(), fp8_ops.dequantize_weight(weight, scale)).to(dtype)
    assert_close(added.h, (out.float() + residual.float()).to(dtype), dtype)
    blocks = torch.stack([(added.h.float()[:, i : i + 8] ** 2).sum(1) for i in range(0, 37, 8)], 1)
    torch.testing.assert_close(added.sumsq, blocks, rtol=1e-5, atol=1e-5)


def test_fp8_weights_one_row_config():
    """One row of FP8 weights: K up to `ONE_TILE_MAX_K` (qkv, o, gate_up) one whole-K tile of 8
    features a program, summed per row (every weight load before the PDL wait); a longer K the
    H100 sweeps' tiles (the 2-D accumulator's <= 64 fp32 a thread; down 8 x 1024), no K split;
    several rows keep the 16-bit rule, and so does the 16-bit LM head's own one-tile rule."""
    pick = gemv_ops.default_config
    assert gemv_config.ONE_TILE_MAX_K == 4096
    for n in (4608, 3584, 37888):  # a 7B's qkv, o, gate_up
        cfg = pick(1, n, 3584, 132, False, True)
        assert (cfg.block_n, cfg.block_k, cfg.num_warps, cfg.split_k) == (8, 4096, 4, 1)
        assert not cfg.fma2d
    down = pick(1, 3584, 18944, 132, True, True)
    assert (down.block_n, down.block_k, down.split_k, down.fma2d) == (8, 1024, 1, True)
    qkv = pick(1, 7168, 5120, 132, False, True)  # K past one tile: the swept tiles
    assert (qkv.block_n, qkv.block_k, qkv.num_warps, qkv.split_k) == (8, 512, 8, 1)
    for n, k in ((7168, 5120), (5120, 5120), (3584, 18944), (2048, 768)):  # 2-D: <= 64 fp32
        cfg = pick(1, n, k, 132, False, True)
        assert cfg.fma2d and cfg.block_n * cfg.block_k <= 64 * 32 * cfg.num_warps, cfg
    assert not pick(1, 37888, 5120, 132, False, True).fma2d  # gate_up: the per-row sums
    assert pick(2, 4608, 3584, 132, False, True) == pick(2, 4608, 3584, 132)
    assert pick(1, 4608, 3584, 132) != pick(1, 4608, 3584, 132, False, True)
    head = pick(1, 152064, 3584, 132)  # the 16-bit LM head: one tile up to 4096, else tiled
    assert (head.block_n, head.block_k) == (4, 4096)
    assert (pick(1, 152064, 5120, 132).block_n, pick(1, 152064, 5120, 132).block_k) == (32, 256)


def test_fp8_weights_bad_inputs_name_the_argument():
    gen = torch.Generator().manual_seed(3)
    weight, scale = fp8_weight(16, 32, gen)
    x = torch.randn(1, 32)
    with pytest.raises(ValueError, match="E4M3 with w_scale"):
        gemv_ops.gemv(x, weight)  # an FP8 weight without its scales
    with pytest.raises(ValueError, match="w_scale must be fp32 with one scale a feature"):
        gemv_ops.gemv(x, weight, w_scale=scale[:8])
    with pytest.raises(ValueError, match="E4M3 with w_scale"):
        gemv_ops.gemv(x, weight.float(), w_scale=scale)  # scales for a 16-bit weight
