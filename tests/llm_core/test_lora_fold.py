"""The shrink folded into a dense layer's base GEMM (`lora/layer.py`'s `fold_storage`, torch
path, CPU): the weight (and bias) become views of longer storage whose tail holds every slot's
A, so loading, the plain product and the GEMV see what they saw; a mixed-adapter step equals
the unfolded math; a step without adapters equals the plain layer exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.llm_core.layers.linear import Linear, PackedLinear
from polymodal.llm_core.lora.layer import LoRABatch, LoRALinearMethod
from polymodal.llm_core.lora.ops import lora_reference

SLOTS, RANK = 2, 4


def _wrapped(layer, dtype=torch.float32):
    batch = LoRABatch(SLOTS, 16, "cpu")
    layer.method = LoRALinearMethod(layer.method, batch, layer, SLOTS, RANK, dtype)
    return batch


def _adapter(layer, gen):
    """`{shard: (A [r, in], B [size, r])}` of ranks below RANK for every slice."""
    slices = {}
    for shard, _, size in layer.method.slice_table():
        a = torch.randn(3, layer.in_features, generator=gen)
        slices[shard] = (a, torch.randn(size, 3, generator=gen) * 0.1)
    return slices


def test_dense_layers_keep_every_slots_a_under_their_weight():
    gen = torch.Generator().manual_seed(0)
    layer = PackedLinear(12, {"q": 8, "k": 4, "v": 4}, bias=True)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    batch = _wrapped(layer)
    method = layer.method
    assert method.folded
    stacked = layer.folded_weight  # [16 + 2 slots x 3 slices x 4, 12]
    assert stacked.shape == (16 + SLOTS * 3 * RANK, 12) and layer.folded_bias.shape == (40,)
    assert layer.weight.data_ptr() == stacked.data_ptr() and layer.weight.shape == (16, 12)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    assert not stacked[16:].any() and not layer.folded_bias[16:].any()
    assert layer.lora_a.data_ptr() == stacked[16].data_ptr()
    # a checkpoint tensor loaded after (a shard) lands in the storage the GEMM reads
    fresh = torch.randn(4, 12, generator=gen)
    layer.weight.weight_loader(layer.weight, fresh, "k")
    assert torch.equal(stacked[8:12], fresh)
    weight[8:12] = fresh
    adapter = _adapter(layer, gen)
    method.set_slot(layer, 1, adapter)
    a_q, _ = adapter["q"]
    assert torch.equal(stacked[16 + 3 * RANK : 16 + 3 * RANK + 3], a_q)  # slot 1, slice q

    x = torch.randn(5, 12, generator=gen)
    batch.set_step([(1, 2), (-1, 1), (1, 2)])
    got = layer(x)
    plain = F.linear(x, weight, bias)
    want = lora_reference(x, plain.clone(), layer.lora_a, layer.lora_b, method.slices, RANK,
                          batch.segments.host_groups)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous() and torch.equal(got[2], plain[2])
    assert not torch.allclose(got[0], plain[0])
    batch.set_step([(-1, 5)])  # no adapter: the plain layer, bit for bit
    assert torch.equal(layer(x), plain)


def test_other_dtypes_keep_a_apart():
    """A layer whose weight is not in the adapters' dtype keeps the standalone shrink."""
    layer = Linear(8, 6, bias=False)
    _wrapped(layer, torch.bfloat16)
    assert not layer.method.folded and layer.lora_a.shape == (SLOTS, RANK, 8)
    assert layer.weight.shape == (6, 8) and not hasattr(layer, "folded_weight")
