"""Whisper's cross-attention weights for word timestamps: one teacher-forced pass of the
decoder over a window's prompt and output tokens, in plain torch with the served model's
weights (the paged attention kernels return no weights), as OpenAI whisper's `find_alignment`
does. The rows equal the cross-attentions transformers' `generate` returns step by step (the
prompt's positions, then one per output token but the last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polymodal.llm_core.models.whisper import WhisperAttention, WhisperForConditionalGeneration


def _heads(attn: WhisperAttention, x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], attn.heads, attn.head_dim).transpose(0, 1)  # [heads, n, head_dim]


@torch.inference_mode()
def cross_attention_weights(
    model: WhisperForConditionalGeneration,
    features: torch.Tensor,
    token_ids: list[int],
    alignment_heads: list[list[int]],
) -> torch.Tensor:
    """The softmaxed cross-attention of each `[layer, head]` of `alignment_heads` over one
    window's encoder rows: `[len(alignment_heads), len(token_ids), rows]` float32.
    `features`: the window's log-mel `[num_mel_bins, 2 * rows]`."""
    weight = model.lm_head.weight
    states = model.audio(features[None].to(weight.device, weight.dtype))  # [rows, d_model]
    decoder = model.model.decoder
    ids = torch.tensor(token_ids, device=weight.device)
    h = decoder.embed_tokens(ids) + decoder.embed_positions.weight[: len(token_ids)]
    wanted = {(int(layer), int(head)) for layer, head in alignment_heads}
    found: dict[tuple[int, int], torch.Tensor] = {}
    for index, layer in enumerate(decoder.layers[: 1 + max(lay for lay, _ in wanted)]):
        attn = layer.self_attn
        x = layer.self_attn_layer_norm(h)
        q = _heads(attn, attn.q_proj(x) * attn.head_dim**-0.5)
        k, v = _heads(attn, attn.k_proj(x)), _heads(attn, attn.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        h = h + attn.out_proj(out.transpose(0, 1).reshape(h.shape))
        cross = layer.encoder_attn
        x = layer.encoder_attn_layer_norm(h)
        q = _heads(cross, cross.q_proj(x) * cross.head_dim**-0.5)
        k, v = _heads(cross, cross.k_proj(states)), _heads(cross, cross.v_proj(states))
        weights = torch.softmax((q @ k.transpose(1, 2)).float(), dim=-1)  # [heads, n, rows]
        for head in range(cross.heads):
            if (index, head) in wanted:
                found[index, head] = weights[head]
        out = weights.to(v.dtype) @ v  # [heads, n, head_dim]
        h = h + cross.out_proj(out.transpose(0, 1).reshape(h.shape))
        h = h + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(h))))
    return torch.stack([found[int(lay), int(head)] for lay, head in alignment_heads]).cpu()
