"""EAGLE / EAGLE-3 heads for the tests: tiny checkpoints in the published layout (SafeAILab's
names, as yuhuili/EAGLE-LLaMA3-Instruct-8B and EAGLE3-LLaMA3.1-Instruct-8B ship them) and an
independent reference of their drafts in plain torch, written from the published code's
semantics (SafeAILab's cnets.py, vLLM's llama_eagle.py / llama_eagle3.py): no cache, the whole
sequence recomputed for each draft."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 128, 480  # the tiny Llama's
DRAFT_VOCAB = 200


def write_head(out: Path, variant: str, seed: int = 0, aux_layers=(1, 2, 3), binary=False):
    """A tiny EAGLE (`variant` "eagle") or EAGLE-3 head for the tiny Llama target, its
    tensors named as published (`binary`: as `pytorch_model.bin`)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * (0.8 / shape[-1] ** 0.5)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    attn_in = HIDDEN if variant == "eagle" else 2 * HIDDEN
    layer = "layers.0." if variant == "eagle" else "midlayer."
    t = {
        layer + "self_attn.q_proj.weight": w(q, attn_in),
        layer + "self_attn.k_proj.weight": w(kv, attn_in),
        layer + "self_attn.v_proj.weight": w(kv, attn_in),
        layer + "self_attn.o_proj.weight": w(HIDDEN, q),
        layer + "mlp.gate_proj.weight": w(INTER, HIDDEN),
        layer + "mlp.up_proj.weight": w(INTER, HIDDEN),
        layer + "mlp.down_proj.weight": w(HIDDEN, INTER),
        layer + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
        "embed_tokens.weight": w(VOCAB, HIDDEN),  # published heads carry a copy: not read
    }
    config = {
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "intermediate_size": INTER, "vocab_size": VOCAB,
        "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "hidden_act": "silu", "model_type": "llama",
        "torch_dtype": "float32",
    }  # fmt: skip
    if variant == "eagle":
        t["fc.weight"] = w(HIDDEN, 2 * HIDDEN)
        t["fc.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
        config["architectures"] = ["LlamaForCausalLMEagle"]
    else:
        t[layer + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        t[layer + "hidden_norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        t["fc.weight"] = w(HIDDEN, 3 * HIDDEN)
        t["norm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        t["lm_head.weight"] = w(DRAFT_VOCAB, HIDDEN)
        targets = torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB].sort().values
        t["d2t"] = targets - torch.arange(DRAFT_VOCAB)
        t["t2d"] = torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, targets, True)
        config.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB,
                      eagle_aux_hidden_state_layer_ids=list(aux_layers))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    if binary:
        torch.save(t, out / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    return out


def record_proposals(engine) -> list[tuple[list[int], list[int]]]:
    """Wrap `engine`'s drafter: every proposal lands in the returned list as (the sequence's
    context then, its drafts)."""
    seen, drafter = [], engine.speculation.drafter
    propose = drafter.propose

    def wrapped(kv, reqs, rooms, vocab):
        drafts = propose(kv, reqs, rooms, vocab)
        seen.extend((r.all_token_ids, d) for r, d in zip(reqs, drafts) if d)
        return drafts

    drafter.propose = wrapped
    return seen


def _rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, theta=10000.0):
    """Llama's rotary (halves rotated) over `x [T, heads, d]`."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions[:, None].double() * inv[None]
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None].float()
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None].float()
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def _layer(t, prefix, x, residual):
    """Causal attention over `x` (its rows at positions 0..T-1) added to `residual`, then the
    SwiGLU MLP of the post-attention norm: the layer's output stream."""
    n = x.shape[0]
    positions = torch.arange(n)
    q = (x @ t[prefix + "self_attn.q_proj.weight"].T).view(n, HEADS, HEAD_DIM)
    k = (x @ t[prefix + "self_attn.k_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM)
    v = (x @ t[prefix + "self_attn.v_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM)
    q, k = _rope(q, positions), _rope(k, positions)
    k = k.repeat_interleave(HEADS // KV_HEADS, 1)
    v = v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
    h = residual + attn @ t[prefix + "self_attn.o_proj.weight"].T
    y = _rms(h, t[prefix + "post_attention_layernorm.weight"])
    gate, up = y @ t[prefix + "mlp.gate_proj.weight"].T, y @ t[prefix + "mlp.up_proj.weight"].T
    return h + (torch.nn.functional.silu(gate) * up) @ t[prefix + "mlp.down_proj.weight"].T


def reference_drafts(target, head_dir: Path, variant: str, context: list[int], k: int,
                     aux_layers=(1, 2, 3)) -> list[int]:  # fmt: skip
    """The head's k greedy drafts after `context` (the last token not yet run by the target),
    recomputed from scratch for each draft. `target`: the transformers model."""
    from safetensors.torch import load_file

    file = head_dir / "model.safetensors"
    t = load_file(str(file)) if file.is_file() else torch.load(head_dir / "pytorch_model.bin")
    t = {k: v.float() if v.is_floating_point() else v for k, v in t.items()}
    ids = torch.tensor([context])
    with torch.no_grad():
        out = target.model(ids, output_hidden_states=True)
        if variant == "eagle":
            features = out.last_hidden_state[0, :-1]  # after the final norm, positions 0..L-2
        else:  # the residual streams entering the aux layers
            streams = torch.cat([out.hidden_states[i][0, :-1] for i in aux_layers], -1)
            features = streams @ t["fc.weight"].T
        embed = target.get_input_embeddings().weight
        tokens, drafts = list(context[1:]), []
        for _ in range(k):
            e = embed[torch.tensor(tokens)]
            if variant == "eagle":
                x = torch.cat([e, features], -1) @ t["fc.weight"].T + t["fc.bias"]
                stream = _layer(t, "layers.0.", x, x)  # layer 0: no input norm
                logits = stream @ target.lm_head.weight.T  # unnormed, the target's head
                token = int(logits[-1].argmax())
            else:
                x = torch.cat([_rms(e, t["midlayer.input_layernorm.weight"]),
                               _rms(features, t["midlayer.hidden_norm.weight"])], -1)  # fmt: skip
                stream = _layer(t, "midlayer.", x, features)
                logits = _rms(stream, t["norm.weight"]) @ t["lm_head.weight"].T
                d = int(logits[-1].argmax())
                token = d + int(t["d2t"][d])
            drafts.append(token)
            tokens.append(token)
            features = torch.cat([features, stream[-1:]])  # its own feature drafts on
    return drafts
