"""The ViT layers' fused forms (`encoders/vit.py`) compute what the plain layer does: q/k/v as
one GEMM over packed weights that still load by HF's names (again after CUDA graphs were
captured on them), each residual add carried into the LayerNorm after it."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from polymodal.encoders.siglip import SiglipVisionTower
from polymodal.encoders.vision_layers import load_checked
from polymodal.encoders.vit import ViTAttention, uniform_segments
from polymodal.llm_core.attention.torch_ref import TorchAttentionBackend

CONFIG = SimpleNamespace(
    patch_size=4, image_size=16, num_channels=3, hidden_size=32, num_hidden_layers=3,
    num_attention_heads=2, intermediate_size=48, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)  # fmt: skip
BACKEND = TorchAttentionBackend()


def random_state(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in module.state_dict().items()}


def plain_attention(attn: ViTAttention, x: torch.Tensor, meta) -> torch.Tensor:
    """The three projections one by one (the layer's definition)."""
    n = x.shape[0]
    q, k, v = (
        p(x).view(n, attn.num_heads, attn.head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    out = BACKEND.varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, attn.head_dim**-0.5)
    return attn.out_proj(out.reshape(n, -1))


def test_qkv_packed_views_load_and_reload_in_place():
    attn = ViTAttention(32, 2)
    assert attn.packed_qkv() is None  # nothing loaded yet: three projections
    load_checked(attn, random_state(attn, 0))
    weight, bias = attn.packed_qkv()
    assert weight.shape == (96, 32) and bias.shape == (96,)
    assert attn.k_proj.weight.data_ptr() == weight[32:].data_ptr()
    x, meta = torch.randn(12, 32), uniform_segments(2, 6, torch.device("cpu"))
    with torch.inference_mode():
        torch.testing.assert_close(attn(x, meta, BACKEND), plain_attention(attn, x, meta))
    # weights loaded again (e.g. after graphs were captured on the packed tensors): written
    # into the same memory, and the packed GEMM sees them
    state = random_state(attn, 1)
    load_checked(attn, state)
    assert attn.packed_qkv()[0].data_ptr() == weight.data_ptr()
    assert torch.equal(weight[64:], state["v_proj.weight"])
    assert torch.equal(bias[:32], state["q_proj.bias"])
    with torch.inference_mode():
        torch.testing.assert_close(attn(x, meta, BACKEND), plain_attention(attn, x, meta))


def test_moved_attention_runs_its_projections_apart():
    """`.to()` gives the parameters new memory: the stale packed tensors are not used."""
    attn = ViTAttention(32, 2)
    load_checked(attn, random_state(attn, 2))
    attn.to(torch.float64)
    assert attn.packed_qkv() is None
    x, meta = torch.randn(12, 32, dtype=torch.float64), uniform_segments(1, 12, torch.device("cpu"))
    with torch.inference_mode():
        assert torch.equal(attn(x, meta, BACKEND), plain_attention(attn, x, meta))
    attn.post_load()  # a load packs them again
    assert attn.packed_qkv() is not None


def test_tower_carries_residual_adds_into_the_norms():
    """The tower (adds deferred into the next LayerNorm, post-LayerNorm included) equals the
    layers run one by one with their adds in place; every feature-layer form agrees."""
    tower = SiglipVisionTower(CONFIG, BACKEND)
    load_checked(tower, random_state(tower, 3))
    pixels = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        x = tower.embeddings(pixels)
        meta = uniform_segments(2, tower.num_positions, x.device)
        states = [x]
        for layer in tower.encoder.layers:
            x = x + plain_attention(layer.self_attn, layer.layer_norm1(x), meta)
            x = x + layer.mlp(layer.layer_norm2(x))
            states.append(x)
        last = tower.post_layernorm(x).view(2, tower.num_positions, -1)
        torch.testing.assert_close(tower(pixels), last)
        for i in (1, -2, 3):
            got = tower(pixels, feature_layer=i)
            torch.testing.assert_close(got, states[i].view(2, tower.num_positions, -1))
        got = tower(pixels, feature_layer=[-1, 1])
        want = torch.cat([states[-1], states[1]], -1).view(2, tower.num_positions, -1)
        torch.testing.assert_close(got, want)
