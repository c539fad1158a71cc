"""Llama 4 image encoder (ViT over tiles with 2D rotary and a class token, pixel shuffle, MLP,
projector) against transformers' `Llama4VisionModel` + `Llama4MultiModalProjector` on the tiny
checkpoint's weights, fp32 on the CPU; one attention segment a tile through the backend."""

import pytest
import torch

from polymodal.encoders import get_encoder_class
from polymodal.encoders.llama4 import Llama4VisionEncoder, rotate_pairs, tile_rotary
from polymodal.llm_core.attention import TorchAttentionBackend
from polymodal.llm_core.weights import iter_safetensors
from polymodal.processors.types import MultimodalItem

_OURS = ("vision_model.", "multi_modal_projector.")


@pytest.fixture(scope="module")
def models(vl_checkpoint):
    import transformers as tf

    path = vl_checkpoint("llama4_vl")
    hf = tf.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def _encoder(path, hf_config, backend=None) -> Llama4VisionEncoder:
    encoder = Llama4VisionEncoder.from_config(hf_config, backend=backend)
    encoder.load_weights((n, t) for n, t in iter_safetensors(path) if n.startswith(_OURS))
    return encoder


def _items(tile_counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for count in tile_counts:
        pixels = torch.randn(count, 3, 28, 28, generator=gen)
        items.append(MultimodalItem("image", {"pixel_values": pixels}, 0, count * 4, ""))
    return items


@pytest.mark.parametrize("tiles", [[1], [5], [1, 3, 5]], ids=["one", "four_and_global", "three"])
def test_matches_transformers(models, tiles):
    path, hf = models
    encoder = _encoder(path, hf.config)
    items = _items(tiles)
    with torch.no_grad():
        ours = encoder.encode(items)
        for item, rows in zip(items, ours):
            features = hf.vision_model(item.data["pixel_values"]).last_hidden_state
            ref = hf.multi_modal_projector(features.flatten(0, 1))
            assert rows.shape == ref.shape == (item.num_embeds, 64)
            torch.testing.assert_close(rows, ref, atol=1e-5, rtol=0)


def test_rotary_table_is_transformers(models):
    """cos/sin per patch pair equal transformers' complex `freqs_ci` (class token: angle 0)."""
    _, hf = models
    vision = hf.config.vision_config
    ref = hf.vision_model.rotary_embedding.freqs_ci[:, 0]  # [tokens, head_dim / 2] complex
    cos, sin = tile_rotary(
        vision.image_size // vision.patch_size,
        vision.hidden_size // vision.num_attention_heads,
        vision.rope_parameters["rope_theta"],
    )
    torch.testing.assert_close(cos, ref.real, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, ref.imag, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_pair_rotation_is_rotate_pairs(dtype):
    """The CUDA path's one launch (`rotary_embedding(pairs=True)`, here interpreted) rotates q
    and k, views of one packed projection, in place as `rotate_pairs` does (fp32, one rounding;
    the class token's angle 0 leaves it as is); v untouched."""
    from polymodal.llm_core.layers import triton_ops

    tokens, heads, head_dim = 17, 3, 16
    qkv = torch.randn(tokens, 3, heads, head_dim).to(dtype)
    q, k, v = qkv.unbind(1)
    cos, sin = tile_rotary(4, head_dim, 10000.0)
    before = qkv.clone()
    want_q, want_k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
    triton_ops.rotary_embedding(q, k, cos, sin, pairs=True)
    # fp32: equal to rounding; bf16: a one-ulp difference where fma rounds once, torch twice
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    assert torch.equal(q[-1], before[-1, 0]) and torch.equal(v, before[:, 2])
    assert (q[:-1] != before[:-1, 0]).float().mean() > 0.5  # the patches did turn


def test_packed_projection_after_load(models):
    """Once loaded, q/k/v's weights are views of one packed weight (one GEMM); the packed and
    the three-projection forms give the same rows."""
    path, hf = models
    encoder = _encoder(path, hf.config)
    attn = encoder.vision_model.model.layers[0].self_attn
    assert attn.packed_qkv() is not None
    x = torch.randn(5, attn.q_proj.in_features)
    packed = attn.project_qkv(x)
    attn.qkv_packed = None  # the three projections apart
    for got, proj in zip(packed, (attn.q_proj, attn.k_proj, attn.v_proj)):
        torch.testing.assert_close(got, proj(x).view(5, attn.num_heads, -1), atol=1e-6, rtol=0)


class RecordingBackend(TorchAttentionBackend):
    def __init__(self):
        self.calls = []

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, scale, causal=False):
        self.calls.append((cu_seqlens.tolist(), max_seqlen, causal))
        return super().varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, causal)


def test_each_tile_is_one_attention_segment(models):
    path, hf = models
    backend = RecordingBackend()
    encoder = _encoder(path, hf.config, backend)
    with torch.no_grad():
        encoder.encode(_items([1, 3]))
    layers = hf.config.vision_config.num_hidden_layers
    assert backend.calls == [(list(range(0, 4 * 17 + 1, 17)), 17, False)] * layers


def test_registered_for_the_architecture():
    assert get_encoder_class("Llama4ForConditionalGeneration") is Llama4VisionEncoder


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_never_waits(models):
    """Triton varlen attention on CUDA: fp32 equal to the CPU tower, bf16 close; a second call
    (rotary tables made) queues without waiting for the device."""
    from polymodal.llm_core.attention import get_backend

    path, hf = models
    torch.backends.cuda.matmul.allow_tf32 = False
    backend = get_backend("triton", "cuda")
    items = _items([5, 1, 3])
    with torch.inference_mode():
        ref = _encoder(path, hf.config).encode(items)
        fp32 = _encoder(path, hf.config, backend).to("cuda")
        cuda_items = _items([5, 1, 3])
        for item in cuda_items:
            item.data["pixel_values"] = item.data["pixel_values"].cuda()
        for got, want in zip(fp32.encode(cuda_items), ref):
            torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
        bf16 = fp32.to(torch.bfloat16)
        bf16.encode(cuda_items)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = bf16.encode(cuda_items)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(out, ref):
        assert got.dtype == torch.bfloat16
        assert (got.float().cpu() - want).abs().max() < 0.05 * want.abs().max()
