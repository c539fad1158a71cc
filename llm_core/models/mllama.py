"""Mllama (`MllamaForConditionalGeneration`: Llama 3.2 11B / 90B Vision): a Llama text decoder
with a cross-attention layer every few layers (`cross_attention_layers`) that reads the image
states of the encoder its registry row names (`encoders/mllama.py`; this file imports no
encoder).

Cross-attention layers (tanh-gated attention and MLP, q/k RMSNorm per head, no rotary) attend
through the cross KV kind: the K/V of a request's image rows are computed once, in its first
step, and every later step reads them from the cache. The rows each token sees follow
transformers' `cross_attention_mask` (`cross_ranges`): text after an image sees that image's
real tiles until the next image (adjacent images together), generated text sees what the last
prompt token sees; text before the first image attends to every row (padding tiles included)
with its cross MLP masked out (the reference's fully masked rows); a text-only request skips the
cross layers (transformers runs them only with image states).

The image token sits past the LM head's vocab (the embedding has 8 more rows).
"""

from __future__ import annotations

import torch
from torch import nn

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.layers.linear import Linear
from polymodal.llm_core.layers.norm import DeferredNorm, RMSNorm, add_norm
from polymodal.llm_core.layers.rotary import RotaryEmbedding
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.llama import MLP, DecoderLayer, Flavor, LlamaForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig

_VISION = "vision."
# images one request may carry (sizes its cross-attention cache: each brings all its tiles)
MAX_IMAGES_PER_REQUEST = 4


def _plain(x) -> torch.Tensor:
    return x.materialize() if isinstance(x, DeferredNorm) else x


class MllamaCrossAttention(nn.Module):
    """Queries from the text, keys/values from the image rows (stored once per request)."""

    def __init__(self, cfg: ModelConfig, backend, encoder_rows: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        hidden = cfg.hidden_size
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_proj = Linear(hidden, q_size, bias=False)
        self.k_proj = Linear(hidden, kv_size, bias=False)
        self.v_proj = Linear(hidden, kv_size, bias=False)
        self.o_proj = Linear(q_size, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        spec = AttentionSpec(
            self.heads, self.kv_heads, self.head_dim, self.head_dim**-0.5, Mask.CROSS,
            encoder_rows=encoder_rows,
        )  # fmt: skip
        self.attn = AttentionLayer(spec, backend)

    def forward(self, x: torch.Tensor, kv_cache, meta) -> torch.Tensor:
        q = self.q_norm(self.q_proj(x).view(x.shape[0], self.heads, self.head_dim))
        states = meta.group(self.attn.kv_group).cross_states  # [rows, hidden] or None
        k = v = None
        if states is not None:  # requests in their first step: store their rows' K/V
            k, v = self._kv(states)
        return self.o_proj(self.attn(q, k, v, None, kv_cache, meta))

    def _kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k_norm(self.k_proj(states).view(-1, self.kv_heads, self.head_dim))
        return k, self.v_proj(states).view(-1, self.kv_heads, self.head_dim)

    def store(self, states: torch.Tensor, kv_cache, meta) -> None:
        """The rows' K/V into this layer's cross cache, at its group's slots (what `forward`
        stores when its step carries `cross_states`)."""
        k, v = self._kv(states)
        slots = meta.group(self.attn.kv_group).slot_mapping
        self.attn.backend.store_kv(k, v, kv_cache, slots, self.attn.kv_scales)


class MllamaCrossLayer(nn.Module):
    """`h + tanh(g_attn) * cross_attn(norm(h))`, then `+ tanh(g_mlp) * gate * mlp(norm(.))`;
    tokens of requests without image rows pass through unchanged."""

    def __init__(self, cfg: ModelConfig, backend, encoder_rows: int):
        super().__init__()
        self.cross_attn = MllamaCrossAttention(cfg, backend, encoder_rows)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden, residual, kv_cache, meta):
        """(hidden, residual) in and out, as the self-attention layers thread them."""
        cross = meta.group(self.cross_attn.attn.kv_group)
        if not cross.any_cross:  # no request of this step has images: skip, as transformers
            return hidden, residual
        x, stream = add_norm(self.input_layernorm, hidden, residual)
        h = stream + self.cross_attn_attn_gate.tanh() * self.cross_attn(_plain(x), kv_cache, meta)
        lo, hi, gate = cross.cross_ranges  # int32 [num_tokens] each
        mlp = self.mlp(self.post_attention_layernorm(h)) * gate[:, None].to(h.dtype)
        out = h + self.cross_attn_mlp_gate.tanh() * mlp
        return torch.where((hi > lo)[:, None], out, stream), None


class MllamaTextModel(nn.Module):
    """Embedding (vocab + 8 rows), Llama self-attention layers and gated cross-attention
    layers, final norm (HF prefix `model.`)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, encoder_rows: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size)
        self.rotary = rotary = RotaryEmbedding(cfg.text_config, cfg.rotary_dim, max_positions)
        cross = set(cfg.text_config.cross_attention_layers)
        flavor = Flavor(qkv_bias=False, qk_norm=False)
        self.layers = nn.ModuleList(
            MllamaCrossLayer(cfg, backend, encoder_rows)
            if i in cross
            else DecoderLayer(cfg, i, rotary, backend, flavor)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        hidden, residual = inputs_embeds, None
        rope = self.rotary.cos_sin(positions)  # once per forward, shared by the self layers
        for layer, kv_cache in zip(self.layers, kv_caches):
            if isinstance(layer, MllamaCrossLayer):
                hidden, residual = layer(hidden, residual, kv_cache, meta)
            else:
                hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        x, _ = add_norm(self.norm, hidden, residual)
        return _plain(x)


class MllamaForConditionalGeneration(SupportsMultiModal, ModelBase):
    """Llama 3.2 Vision: decoder + tiled image encoder; image states reach the decoder through
    the cross KV cache, not token slots."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    # the hub's layout (`language_model.model.`, `vision_model.`), transformers v5's
    # (`model.language_model.`, `model.vision_model.`): onto `model.` and the encoder's `vision.`
    weight_name_remap = [
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
        ("model.vision_model.", _VISION + "vision_model."),
        ("vision_model.", _VISION + "vision_model."),
        ("model.multi_modal_projector.", _VISION + "multi_modal_projector."),
        ("multi_modal_projector.", _VISION + "multi_modal_projector."),
    ]
    extra_input_ids = 8  # the image token (and 7 reserved rows) past the LM head's vocab

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__()
        self.config = cfg
        vision = cfg.hf_config.vision_config
        self.max_tiles = vision.max_num_tiles
        self.tile_rows = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class
        rows = MAX_IMAGES_PER_REQUEST * self.max_tiles * self.tile_rows
        self.model = MllamaTextModel(cfg, backend, max_positions, rows)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        device = self.lm_head.weight.device
        self.vision = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        return self.model(positions, inputs_embeds, kv_caches, meta)

    def encode(self, items: list) -> list[torch.Tensor]:
        """Each image's `max_tiles * (patches + 1)` rows (padding tiles included)."""
        self.stage(items)
        return self.vision.encode(items)

    def store_cross_states(self, states: torch.Tensor, kv_caches: list, meta) -> bool:
        """Every cross layer's K/V of the rows, ahead of a step that then replays a prefill
        graph (the projections of an image's 6404 rows are large GEMMs, eager either way)."""
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            if isinstance(layer, MllamaCrossLayer):
                layer.cross_attn.store(states, kv_cache, meta)
        return True

    def cross_states(self, items: list, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Every image's real tiles first (image order), then every padding tile: a run of
        adjacent images' real rows is one contiguous range."""
        real = [int(item.data["num_tiles"]) * self.tile_rows for item in items]
        return torch.cat(
            [out[:n] for out, n in zip(outputs, real)] + [out[n:] for out, n in zip(outputs, real)]
        )

    def cross_ranges(self, items: list, num_prompt_tokens: int) -> list:
        """transformers' `cross_attention_mask` as row ranges of `cross_states`' layout."""
        tiles = [int(item.data["num_tiles"]) for item in items]
        return cross_row_ranges(
            [item.slot_start for item in items], tiles, num_prompt_tokens, self.tile_rows,
            self.max_tiles,
        )  # fmt: skip


def cross_row_ranges(
    locations: list[int], num_tiles: list[int], length: int, tile_rows: int, max_tiles: int
) -> list[tuple[int, int, int, int]]:
    """Pieces `(first position, lo, hi, gate)` for images at token `locations` with `num_tiles`
    real tiles each, rows laid out real tiles first (`cross_states`): a token that sees images
    a..b (adjacent indices) sees rows [start of a, end of b); one that sees none, every row
    with gate 0 (transformers' fully masked row)."""
    real = [n * tile_rows for n in num_tiles]
    offsets = [sum(real[:i]) for i in range(len(real) + 1)]
    total = len(locations) * max_tiles * tile_rows
    spans = image_token_spans(locations, length)
    pieces: list[tuple[int, int, int, int]] = []
    for pos in range(length):
        seen = [i for i, (a, b) in enumerate(spans) if a <= pos < b]
        piece = (pos, offsets[seen[0]], offsets[seen[-1] + 1], 1) if seen else (pos, 0, total, 0)
        if not pieces or pieces[-1][1:] != piece[1:]:
            pieces.append(piece)
    return pieces


def image_token_spans(locations: list[int], length: int) -> list[tuple[int, int]]:
    """Per image, the token positions `[start, end)` that see it (transformers'
    `get_cross_attention_token_mask`): from its token to the next image's, the last to the end;
    a run of adjacent image tokens all reach the end of the run's span."""
    if not locations:
        return []
    spans = [[a, b] for a, b in zip(locations, locations[1:])] + [[locations[-1], length]]
    end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    return [(a, b) for a, b in spans]


MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}"
)
# the image token last: it gets the tokenizer's last id, just past the tiny LM head's vocab
MLLAMA_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "python_token": "<|python_tag|>",
    "image_token": "<|image|>",
}


def _tiny_mllama() -> TinyConfig:
    """Five text layers (cross attention at 1 and 3), a 28 px tile of 7 px patches (16 + 1
    rows a tile, 4 tiles at most), two local layers kept of four, two global layers."""

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        text = {
            **kwargs,
            "vocab_size": kwargs["vocab_size"] - 1,  # the image token is the last id
            "num_hidden_layers": 5,
            "cross_attention_layers": [1, 3],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        }
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_global_layers=2,
            attention_heads=2,
            image_size=28,
            patch_size=7,
            max_num_tiles=4,
            vision_output_dim=32 * 3,
            intermediate_layers_indices=[2, 0],
        )
        return tf.MllamaConfig(
            text_config=text, vision_config=vision, image_token_index=ids["<|image|>"]
        )

    def make_model(hf_config, dtype):
        import transformers as tf

        model = tf.MllamaForConditionalGeneration._from_config(hf_config, dtype=dtype)
        with torch.no_grad():  # gates start at 0 (no image effect): open them
            for name, param in model.named_parameters():
                if name.endswith(("gate", "_gate", "gate_attn", "gate_ffn")):
                    param.uniform_(0.3, 0.9)
        return model

    def write_processor(out, tokenizer) -> None:
        import transformers as tf

        images = tf.MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4)
        processor = tf.MllamaProcessor(
            image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template
        )
        processor.save_pretrained(out)

    return TinyConfig(
        "MllamaForConditionalGeneration",
        build=build,
        make_model=make_model,
        write_extra=write_processor,
        tokens=MLLAMA_TOKENS,
        chat_template=MLLAMA_TEMPLATE,
    )


TINY_CONFIGS = {"mllama": _tiny_mllama()}
