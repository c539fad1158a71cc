"""DeciLM / Nemotron-NAS (Llama-3.1-Nemotron-51B, Llama-3.3-Nemotron-Super-49B): Llama layers
pruned per layer by neural architecture search. `block_configs[i]` says what layer i keeps:

- attention: standard (Llama's, with `num_attention_heads / n_heads_in_group` kv heads of its
  own), `replace_with_linear` (one `hidden x hidden` matrix, `self_attn.linear_attn`), or
  `no_op` (nothing: no norm, no KV cache);
- FFN: a SwiGLU of its own size (`ffn_mult`: `intermediate = round_up(int(2 * ffn_mult *
  hidden / 3), 256)`, or `intermediate_size`), `replace_with_linear` (`mlp.linear_mlp`), or
  `no_op`.
Each kept sub-block is pre-norm with a residual add, as Llama's. Layers keep their own KV specs
(kv-head counts differ per layer: one block table, a cache tensor per layer of its own shape;
no-op attention layers have none). transformers has no class for these checkpoints (their
`model_type` "nemotron-nas" needs the hub's remote code): `DeciLMConfig` parses them.
Not supported (raise): per-layer windows, sink attention, Mamba / MoE / Llama-4 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import LlamaConfig

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import UnsupportedModelError
from polymodal.llm_core.layers.linear import Linear
from polymodal.llm_core.layers.norm import DeferredNorm, RMSNorm, add_norm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import MLP, Attention, Flavor, LlamaForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig


class DeciLMConfig(LlamaConfig):
    """A Llama config with `block_configs` (one dict per layer: {"attention": {...}, "ffn":
    {...}}), for checkpoints whose `model_type` transformers does not know."""

    model_type = "nemotron-nas"


@dataclass(frozen=True)
class Block:
    """One layer's choices, parsed from its `block_configs` entry."""

    attention: str  # "standard", "linear" or "no_op"
    ffn: str
    n_heads_in_group: int = 1
    intermediate_size: int = 0

    @classmethod
    def parse(cls, entry, hidden_size: int, layer_idx: int) -> Block:
        attn, ffn = _as_dict(entry["attention"]), _as_dict(entry["ffn"])
        for key in ("window_length", "sparsify", "llama4", "mamba", "moe"):
            if attn.get(key) or ffn.get(key):
                raise UnsupportedModelError(f"DeciLM layer {layer_idx}: {key!r} blocks")
        if attn.get("unshifted_sink") or attn.get("num_sink_tokens"):
            raise UnsupportedModelError(f"DeciLM layer {layer_idx}: sink attention")
        inter = ffn.get("intermediate_size") or 0
        if ffn.get("ffn_mult") is not None:
            inter = -(-int(2 * ffn["ffn_mult"] * hidden_size / 3) // 256) * 256
        return cls(
            _kind(attn), _kind(ffn), attn.get("n_heads_in_group") or 1, inter
        )  # fmt: skip


def _as_dict(config) -> dict:
    return config if isinstance(config, dict) else vars(config)


def _kind(config: dict) -> str:
    if config.get("no_op"):
        return "no_op"
    return "linear" if config.get("replace_with_linear") else "standard"


class LinearAttention(nn.Module):
    """Attention replaced by one matrix (`self_attn.linear_attn`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_attn = Linear(hidden_size, hidden_size, bias=False)

    def forward(self, rope, x, kv_cache, meta, residual=None):
        return self.linear_attn.fused(x, residual=residual)


class LinearMLP(nn.Module):
    """FFN replaced by one matrix (`mlp.linear_mlp`)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_mlp = Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x, residual=None):
        return self.linear_mlp.fused(x, residual=residual)


class DeciLMDecoderLayer(nn.Module):
    """The sub-blocks a layer keeps, each `stream += block(norm(stream))`; the adds are threaded
    as Llama's (`(block output, stream)`), so a no-op sub-block passes both through."""

    def __init__(self, cfg: ModelConfig, block: Block, layer_idx: int, rotary, backend):
        super().__init__()
        text = cfg.text_config
        self.block = block
        if block.attention != "no_op":
            self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            if block.attention == "linear":
                self.self_attn = LinearAttention(cfg.hidden_size)
            else:
                layer_cfg = replace(cfg, num_kv_heads=cfg.num_heads // block.n_heads_in_group)
                bias = bool(getattr(text, "attention_bias", False))
                flavor = Flavor(bias, False, bool(getattr(text, "o_proj_bias", bias)))
                self.self_attn = Attention(layer_cfg, layer_idx, rotary, backend, flavor)
        if block.ffn != "no_op":
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            if block.ffn == "linear":
                self.mlp = LinearMLP(cfg.hidden_size)
            else:
                self.mlp = MLP(replace(cfg, intermediate_size=block.intermediate_size))

    @property
    def uses_kv_cache(self) -> bool:
        return self.block.attention == "standard"

    def forward(self, rope, hidden, residual, kv_cache, meta):
        if self.block.attention != "no_op":
            x, residual = add_norm(self.input_layernorm, hidden, residual)
            hidden = self.self_attn(rope, x, kv_cache, meta, residual)
        if self.block.ffn != "no_op":
            x, residual = add_norm(self.post_attention_layernorm, hidden, residual)
            hidden = self.mlp(x, residual)
        return hidden, residual


class DeciLMModel(nn.Module):
    """Embedding, the NAS layers, final norm (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        text = cfg.text_config
        if getattr(text, "position_embedding_type", "rope") != "rope":
            raise UnsupportedModelError(
                f"DeciLM with position_embedding_type {text.position_embedding_type!r}"
            )
        blocks = [Block.parse(e, cfg.hidden_size, i) for i, e in enumerate(text.block_configs)]
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(text, cfg.rotary_dim, max_positions)
        self.layers = nn.ModuleList(
            DeciLMDecoderLayer(cfg, block, i, self.rotary, backend)
            for i, block in enumerate(blocks)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        hidden, residual = inputs_embeds, None
        rope = self.rotary.cos_sin(positions)  # once per forward, shared by every layer
        caches = iter(kv_caches)  # one per layer with standard attention, in order
        for layer in self.layers:
            kv_cache = next(caches) if layer.uses_kv_cache else None
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        x, _ = add_norm(self.norm, hidden, residual)
        return x.materialize() if isinstance(x, DeferredNorm) else x


class DeciLMForCausalLM(ModelBase):
    """DeciLM / Nemotron-NAS: `embed`, `forward`, `compute_logits`."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    hf_config_class = DeciLMConfig

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.attach_decoder(cfg, DeciLMModel(cfg, backend, max_positions))


# ---- tiny checkpoints (transformers has no class to write them) -------------------------------


class TinyDeciCheckpoint(nn.Module):
    """Random weights under a DeciLM checkpoint's names and shapes, saved as `save_pretrained`
    lays them out (the tests' reference reads the saved files, not this module)."""

    def __init__(self, hf_config):
        super().__init__()
        self.config = hf_config
        h, heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = hf_config.head_dim or h // heads
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(hf_config.vocab_size, h)
        self.model.layers = nn.ModuleList()
        for i, entry in enumerate(hf_config.block_configs):
            block, layer = Block.parse(entry, h, i), nn.Module()
            if block.attention != "no_op":
                layer.input_layernorm = _norm(h)
                layer.self_attn = nn.Module()
                if block.attention == "linear":
                    layer.self_attn.linear_attn = nn.Linear(h, h, bias=False)
                else:
                    q, kv = heads * head_dim, heads // block.n_heads_in_group * head_dim
                    shapes = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h)}
                    for name, (n_in, n_out) in shapes.items():
                        setattr(layer.self_attn, f"{name}_proj", nn.Linear(n_in, n_out, False))
            if block.ffn != "no_op":
                layer.post_attention_layernorm = _norm(h)
                layer.mlp = nn.Module()
                if block.ffn == "linear":
                    layer.mlp.linear_mlp = nn.Linear(h, h, bias=False)
                else:
                    inter = block.intermediate_size
                    layer.mlp.gate_proj = nn.Linear(h, inter, bias=False)
                    layer.mlp.up_proj = nn.Linear(h, inter, bias=False)
                    layer.mlp.down_proj = nn.Linear(inter, h, bias=False)
            self.model.layers.append(layer)
        self.model.norm = _norm(h)
        self.lm_head = nn.Linear(h, hf_config.vocab_size, bias=False)

    def save_pretrained(self, out) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        self.config.save_pretrained(out)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})


def _norm(size: int) -> nn.Module:
    norm = nn.Module()
    norm.weight = nn.Parameter(1.0 + 0.1 * torch.randn(size))  # not all ones: a real test
    return norm


def _block(attention="standard", ffn="standard", group=2, ffn_mult=1.0) -> dict:
    return {
        "attention": {"no_op": attention == "no_op", "replace_with_linear": attention == "linear",
                      "n_heads_in_group": group},
        "ffn": {"no_op": ffn == "no_op", "replace_with_linear": ffn == "linear",
                "ffn_mult": ffn_mult},
    }  # fmt: skip


def _tiny_deci(architecture: str, blocks: list[dict]) -> TinyConfig:
    def build(kwargs: dict, ids: dict):
        cfg = DeciLMConfig(**{**kwargs, "num_hidden_layers": len(kwargs["block_configs"])})
        cfg.architectures = [architecture]
        return cfg

    return TinyConfig(
        architecture,
        {"head_dim": 16, "block_configs": blocks},
        build=build,
        make_model=lambda hf_config, dtype: TinyDeciCheckpoint(hf_config).to(dtype),
    )


TINY_CONFIGS = {
    # Nemotron-51B-like: kv heads 2 / 4 / 1 per layer, linear and no-op replacements, FFNs of
    # 256 and 512 (ffn_mult 2.5 on hidden 64 -> 106 -> 256; 5.0 -> 213 -> 256; 7 -> 512)
    "decilm": _tiny_deci(
        "DeciLMForCausalLM",
        [
            _block(group=2, ffn_mult=2.5),
            _block("no_op", ffn_mult=7.0),
            _block(group=1, ffn="linear"),
            _block("linear", ffn_mult=5.0),
            _block(group=4, ffn="no_op"),
            _block("no_op", "no_op"),
        ],
    ),
    # Super-49B-like under the other architecture name: mostly standard, one no-op attention
    "nemotron_nas": _tiny_deci(
        "NemotronNASForCausalLM",
        [_block(group=2), _block("no_op", ffn_mult=2.0), _block(group=4, ffn_mult=1.5)],
    ),
}
