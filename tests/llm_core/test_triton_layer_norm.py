"""The residual add + LayerNorm kernel (`triton_norm.add_layer_norm`) as BERT's post-LN blocks
run it (the sum not kept, a strided residual) against its torch reference on CPU under
TRITON_INTERPRET=1 (`interpreted.py`); the pre-norm form: test_triton_norm.py; on CUDA:
test_layer_norm_gpu.py."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.layers import triton_norm as kernels
from polymodal.llm_core.layers.norm import LayerNorm
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


def _norm(hidden: int, dtype: torch.dtype) -> LayerNorm:
    norm = LayerNorm(hidden, eps=1e-12).to(dtype)
    with torch.no_grad():  # not the identity: scale and shift must be applied
        norm.weight.copy_(torch.randn(hidden))
        norm.bias.copy_(torch.randn(hidden))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_layer_norm(dtype, with_residual):
    """Rows of 48 (a masked tail of the 64-wide block), a mean far from 0 (the centering), and
    a residual given as a strided view (a column slice of a wider tensor)."""
    x = (3 * torch.randn(2, 5, 48) + 4).to(dtype)
    residual = torch.randn(2, 5, 80).to(dtype)[..., 16:64] if with_residual else None
    norm = _norm(48, dtype)
    kept, out = kernels.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, False)
    _, ref = kernels.add_layer_norm_ref(x, residual, norm.weight, norm.bias, norm.eps)
    assert kept is None and out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref, dtype)


def test_layer_norm_module_adds_the_residual():
    """`LayerNorm(x, residual)` is `nn.LayerNorm(x + residual)` (the CPU path BERT runs); its
    parameters keep nn.LayerNorm's names."""
    norm = _norm(48, torch.float32)
    x, residual = torch.randn(7, 48), torch.randn(7, 48)
    plain = torch.nn.LayerNorm(48, eps=1e-12)
    plain.load_state_dict(norm.state_dict())
    assert torch.equal(norm(x, residual), plain(x + residual))
    assert torch.equal(norm(x), plain(x))
    assert sorted(norm.state_dict()) == ["bias", "weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("split", [True, False])
def test_add_layer_norm_of_gated_parts(dtype, gated, split):
    """Mllama's tower form: the delta as two parts along a sample's rows (its first 5 rows,
    then 7) for a batch of two, or whole, times a gate: the sum is `x + gate * cat(parts)` (bit
    for bit in fp32; in bf16 the interpreter's casts may differ from torch's by an ulp),
    the norm as the reference's."""
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 12, 48) + 4).to(dtype)
    parts = (torch.randn(2, 5, 48).to(dtype), torch.randn(2, 7, 48).to(dtype))
    delta = parts if split else torch.cat(parts, dim=1)
    gate = torch.tensor([0.3]).tanh().to(dtype) if gated else None
    norm = _norm(48, dtype)
    total, out = kernels.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps, True, gate)
    ref_total, ref = kernels.add_layer_norm_ref(x, parts, norm.weight, norm.bias, norm.eps, gate)
    whole = torch.cat(parts, dim=1)
    assert torch.equal(ref_total, x + (gate * whole if gated else whole))
    if dtype == torch.float32:
        assert torch.equal(total, ref_total)
    assert_close(total, ref_total, dtype)
    assert_close(out, ref, dtype)


def test_gated_product_rounds_to_nearest_bf16():
    """With x = 0 the sum is the gated product itself: bf16's nearest (ties to even) of
    gate * delta, bit for bit torch's, however the casts round (the kernel rounds it with
    integer ops: the GPU compiler had dropped that cast's rounding)."""
    torch.manual_seed(1)
    delta = torch.randn(4, 64).bfloat16()
    gate = torch.tensor([0.7]).bfloat16().tanh()
    norm = _norm(64, torch.bfloat16)
    x = torch.zeros_like(delta)
    total, _ = kernels.add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps, True, gate)
    assert torch.equal(total, gate * delta)
