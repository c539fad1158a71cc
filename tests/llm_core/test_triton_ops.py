"""The elementwise Triton kernels (`layers/triton_ops.py`: norms, activations, rotary, id and
table unpacking, the logits argmax, the M-RoPE gather) against their torch references, on CPU
under TRITON_INTERPRET=1 (set up in `interpreted.py`)."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.layers import triton_ops
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    x = torch.randn(2, 5, 48).to(dtype)
    residual = torch.randn(2, 5, 48).to(dtype) if with_residual else None
    weight = torch.randn(48).to(dtype)
    out, new_res = triton_ops.rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = triton_ops.rms_norm_ref(x, weight, 1e-6, residual)
    assert out.shape == x.shape and out.dtype == ref_out.dtype
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemma_rms_norm(dtype, with_residual):
    """The (1 + w) variant (`unit_offset`) equals `GemmaRMSNorm`'s torch path (HF's order:
    normalize and scale in fp32, cast once)."""
    from polymodal.llm_core.layers.norm import GemmaRMSNorm

    x = torch.randn(7, 48).to(dtype)
    residual = torch.randn(7, 48).to(dtype) if with_residual else None
    norm = GemmaRMSNorm(48, 1e-6).to(dtype)
    norm.weight.data = (0.5 * torch.randn(48)).to(dtype)
    out, new_res = triton_ops.rms_norm(x, norm.weight, 1e-6, residual, unit_offset=True)
    ref = norm(x, residual) if with_residual else (norm(x), x)
    assert out.dtype == dtype
    assert_close(out, ref[0], dtype)
    assert_close(new_res, ref[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_and_mul(dtype):
    x = (3 * torch.randn(5, 2 * 40)).to(dtype)
    out = triton_ops.silu_and_mul(x, gelu_tanh=True)
    gate, up = x.float().chunk(2, -1)
    ref = (torch.nn.functional.gelu(gate, approximate="tanh") * up).to(dtype)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = torch.randn(3, 4, 2 * 40).to(dtype)
    out = triton_ops.silu_and_mul(x)
    assert out.shape == (3, 4, 40)
    assert_close(out, triton_ops.silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # full and partial rotary
def test_rotary_in_place_on_packed_qkv_views(dtype, rotary_dim):
    tokens, heads, kv_heads, head_dim = 7, 3, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    angles = torch.randn(tokens, rotary_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    ref_q, ref_k = triton_ops.rotary_embedding_ref(q.clone(), k.clone(), cos, sin)
    triton_ops.rotary_embedding(q, k, cos, sin)
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


def test_rotary_q_alone_when_k_is_empty():
    """The vision towers rotate one tensor: `k` with no tokens leaves only q rotated."""
    q = torch.randn(5, 3, 16)
    angles = torch.randn(5, 8)
    ref_q, _ = triton_ops.rotary_embedding_ref(q.clone(), q.clone(), angles.cos(), angles.sin())
    out_q, out_k = triton_ops.rotary_embedding(q, q[:0], angles.cos(), angles.sin())
    assert out_q is q and out_k.shape[0] == 0
    assert_close(q, ref_q, torch.float32)


def test_resolve_ids():
    from polymodal.llm_core.cuda_graph import resolve_ids  # the torch path on CPU tensors

    gen = torch.Generator().manual_seed(5)
    for n in (1, 7, 1500):  # one program, a partial one, several
        ids = torch.randint(0, 1000, (n,), generator=gen)
        tokens = torch.randint(1000, 2000, (n + 3,), generator=gen)
        src = torch.randint(-1, n + 3, (n,), generator=gen)
        expected = resolve_ids(ids, src, tokens)
        assert torch.equal(triton_ops.resolve_ids(ids, src, tokens), expected)
    assert (expected >= 1000).any() and (expected < 1000).any()  # both kinds of rows


def test_unpack_tables():
    """Packed [rows, groups, width] tables land in the full-width buffer's first `width`
    columns (several chunks of a row, a partial one); columns past it keep their old ids."""
    from polymodal.llm_core.cuda_graph import unpack_tables  # the torch path on CPU tensors

    gen = torch.Generator().manual_seed(9)
    for rows, groups, width, max_blocks in ((1, 1, 1, 8), (3, 2, 5, 8), (4, 3, 1500, 2100)):
        packed = torch.randint(0, 10_000, (rows * groups * width + 7,), generator=gen).int()
        old = torch.randint(0, 10_000, (rows + 1, groups, max_blocks), generator=gen).int()
        width_t = torch.tensor([width], dtype=torch.int32)
        expected = old.clone()
        unpack_tables(packed, width_t, expected, rows)
        out = old.clone()
        triton_ops.unpack_tables(packed, width_t, out, rows)
        assert torch.equal(out, expected)
        grid = packed[: rows * groups * width].view(rows, groups, width)
        assert torch.equal(out[:rows, :, :width], grid)
        assert torch.equal(out[:rows, :, width:], old[:rows, :, width:])
        assert torch.equal(out[rows:], old[rows:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_argmax(dtype):
    """Cast + argmax over 3 rows of 9000 (3 chunks, the last partial), ties broken to the first
    index as torch.argmax does: a tie inside a chunk and one across chunks."""
    gen = torch.Generator().manual_seed(3)
    raw = torch.randn(3, 9000, generator=gen).to(dtype)
    raw[1, [70, 90]] = 50.0  # tie inside chunk 0
    raw[2, [8500, 5000]] = 60.0  # tie across chunks 1 and 2
    out = torch.empty(3, 9000)
    tokens = torch.empty(3, dtype=torch.int64)
    for _ in range(2):  # the arrival counters are back at zero
        triton_ops.logits_argmax(raw, out, tokens)
        assert torch.equal(out, raw.float())
        assert tokens.tolist() == raw.float().argmax(-1).tolist()
    assert tokens.tolist()[1:] == [70, 5000]


def test_logits_argmax_of_non_finite_rows_is_a_token():
    """Overflowed logits (NaN / inf rows, as a model in 16 bits can give) still pick an id
    inside the vocabulary: NaN counts as +inf, so an all-NaN row gives its first index, and the
    masked tail of the last partial chunk never wins (its index would be past the vocab: the
    next step's embedding lookup asserted on CUDA)."""
    raw = torch.randn(4, 9000)
    raw[0] = float("nan")
    raw[1, 8300:] = float("nan")  # NaN only in the last, partial chunk
    raw[2, 4200] = float("nan")
    raw[3] = float("-inf")
    out = torch.empty(4, 9000)
    tokens = torch.empty(4, dtype=torch.int64)
    triton_ops.logits_argmax(raw, out, tokens)
    assert tokens.tolist() == [0, 8300, 4200, 0]
    assert torch.equal(out.isnan(), raw.isnan())


def test_mrope_cos_sin_matches_the_torch_gather():
    from types import SimpleNamespace

    from polymodal.llm_core.layers.rotary import RotaryEmbedding

    cfg = SimpleNamespace(rope_theta=10000.0, rope_parameters=None)
    rotary = RotaryEmbedding(cfg, 32, 64, mrope_section=[4, 6, 6])
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 64, (3, 11), generator=gen)
    cos, sin = triton_ops.mrope_cos_sin(rotary.cos_sin_cache, positions, rotary.mrope_section)
    ref_cos, ref_sin = rotary.cos_sin(positions)  # CPU tensors: the torch path
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
