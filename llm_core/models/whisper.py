"""Whisper (`WhisperForConditionalGeneration`: openai/whisper-tiny ... large-v3): the text
decoder, fed by the audio encoder its registry row names (`encoders/whisper.py`; this file
imports no encoder) through the cross KV kind.

Each decoder layer: pre-LayerNorm causal self-attention (learned absolute positions, no rotary),
cross-attention over the request's encoder rows (one 30 s window: `max_source_positions` rows,
their K/V written once, in the request's first step), and a GELU MLP; queries are scaled before
the product as transformers does (inside the attention kernel when the scale is a power of two:
the same bits); the output projection is tied to the token embedding. At one row (batch-1
decode) the residual adds run in the output projections' GEMV. The
decoder prompt carries the task (`<|startoftranscript|>`, language, task, `<|notimestamps|>`:
`processors/whisper.py`); transformers' `suppress_tokens` / `begin_suppress_tokens` come from
generation_config.json as sampling defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig

from polymodal.llm_core.attention.layer import AttentionLayer
from polymodal.llm_core.attention.spec import AttentionSpec, Mask
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.layers.linear import Linear
from polymodal.llm_core.layers.norm import AddedResidual
from polymodal.llm_core.models.base import ModelBase
from polymodal.llm_core.models.tiny import TinyConfig


class WhisperDecoderConfig(WhisperConfig):
    """transformers' `WhisperConfig` read from the decoder's side: the core's field names
    (layers, heads, MLP width, positions) are the decoder's, not the encoder's."""

    attribute_map = {
        "num_key_value_heads": "decoder_attention_heads",
        "num_attention_heads": "decoder_attention_heads",
        "hidden_size": "d_model",
        "num_hidden_layers": "decoder_layers",
        "intermediate_size": "decoder_ffn_dim",
        "max_position_embeddings": "max_target_positions",
    }


class WhisperAttention(nn.Module):
    """q/v/out with biases, k without (HF's names); self-attention (causal, cached per token)
    or cross-attention (`Mask.CROSS`: the encoder rows' K/V, cached per request)."""

    def __init__(self, cfg: ModelConfig, backend, encoder_rows: int | None = None):
        super().__init__()
        dim, self.heads = cfg.hidden_size, cfg.num_heads
        self.head_dim = dim // self.heads
        self.q_proj = Linear(dim, dim, bias=True)
        self.k_proj = Linear(dim, dim, bias=False)
        self.v_proj = Linear(dim, dim, bias=True)
        self.out_proj = Linear(dim, dim, bias=True)
        self.cross = encoder_rows is not None
        mask = Mask.CROSS if self.cross else Mask.CAUSAL
        # transformers scales q before the product. A power of two (head_dim 64: 1/8, every
        # released size) scales exactly wherever it is applied, so the attention kernel
        # applies it (one kernel fewer a layer); any other scale stays on q (its rounding).
        scale = self.head_dim**-0.5
        exact = math.frexp(scale)[0] == 0.5
        self.q_scale = 1.0 if exact else scale
        spec = AttentionSpec(self.heads, self.heads, self.head_dim, scale if exact else 1.0,
                             mask, encoder_rows=encoder_rows)  # fmt: skip
        self.attn = AttentionLayer(spec, backend)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.heads, self.head_dim)  # [rows, heads, head_dim]

    def forward(self, x: torch.Tensor, kv_cache, meta, residual: torch.Tensor) -> torch.Tensor:
        """`residual + out_proj(attention(x))`."""
        q = self.q_proj(x)
        q = self._heads(q if self.q_scale == 1.0 else q * self.q_scale)
        source = meta.group(self.attn.kv_group).cross_states if self.cross else x
        k = v = None
        if source is not None:  # self: this step's tokens; cross: rows of first steps only
            k, v = self._heads(self.k_proj(source)), self._heads(self.v_proj(source))
        return add_output(self.out_proj, self.attn(q, k, v, None, kv_cache, meta), residual)


def add_output(linear: Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`residual + linear(x)`: the add folded into a one-row GEMV's epilogue (batch-1 decode:
    one kernel fewer; the product rounded first, as the eager add), else a separate add."""
    out = linear.fused(x, residual=residual)
    return out.h if isinstance(out, AddedResidual) else residual + out


class WhisperDecoderLayer(nn.Module):
    """h + self_attn(LN(h)); h + encoder_attn(LN(h)) (tokens with encoder rows); h + MLP(LN(h))."""

    def __init__(self, cfg: ModelConfig, backend, encoder_rows: int):
        super().__init__()
        dim = cfg.hidden_size
        self.self_attn = WhisperAttention(cfg, backend)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.encoder_attn = WhisperAttention(cfg, backend, encoder_rows)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = Linear(dim, cfg.intermediate_size, bias=True)
        self.fc2 = Linear(cfg.intermediate_size, dim, bias=True)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(
        self, h: torch.Tensor, self_cache, cross_cache, meta, audio: torch.Tensor | None
    ) -> torch.Tensor:
        """`audio`: bool `[tokens, 1]`, the tokens with encoder rows (None: no token has any)."""
        h = self.self_attn(self.self_attn_layer_norm(h), self_cache, meta, h)
        if audio is not None:
            attended = self.encoder_attn(self.encoder_attn_layer_norm(h), cross_cache, meta, h)
            h = torch.where(audio, attended, h)  # a request without audio: skip
        return add_output(self.fc2, F.gelu(self.fc1(self.final_layer_norm(h))), h)


class WhisperDecoder(nn.Module):
    """Token + learned position embeddings, decoder layers, final LayerNorm (HF prefix
    `model.decoder.`)."""

    def __init__(self, cfg: ModelConfig, backend, encoder_rows: int):
        super().__init__()
        hf = cfg.hf_config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = nn.Embedding(hf.max_target_positions, cfg.hidden_size)
        self.layers = nn.ModuleList(
            WhisperDecoderLayer(cfg, backend, encoder_rows) for _ in range(cfg.num_layers)
        )
        self.layer_norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        h = inputs_embeds + self.embed_positions(positions)
        # which tokens have encoder rows: the same in every cross group, found once
        cross = meta.group(self.layers[0].encoder_attn.attn.kv_group)
        audio = None
        if cross.any_cross:
            lo, hi, _ = cross.cross_ranges
            audio = (hi > lo)[:, None]  # [tokens, 1]
        # one self and one cross cache per layer, in module order
        for i, layer in enumerate(self.layers):
            h = layer(h, kv_caches[2 * i], kv_caches[2 * i + 1], meta, audio)
        return self.layer_norm(h)


class _Model(nn.Module):
    def __init__(self, decoder: WhisperDecoder):
        super().__init__()
        self.decoder = decoder


class WhisperForConditionalGeneration(SupportsMultiModal, ModelBase):
    """Whisper: audio encoder + text decoder; the audio reaches the decoder through the cross
    KV cache. `encode(items)`: each 30 s window's `[max_source_positions, d_model]` states."""

    hf_config_class = WhisperDecoderConfig
    # the encoder's tensors go to its module (`audio.`); the output projection is HF's
    # `proj_out` (tied to the embedding: absent from most checkpoints)
    weight_name_remap = [("model.encoder.", "audio."), ("proj_out.", "lm_head.")]

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__()
        self.config = cfg
        rows = cfg.hf_config.max_source_positions
        self.model = _Model(WhisperDecoder(cfg, backend, rows))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
            embed = "model.decoder.embed_tokens.weight"
            self.tied_parameters = {"proj_out.weight": embed, "lm_head.weight": embed}
        device = self.lm_head.weight.device
        self.audio = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.embed_tokens(input_ids)

    def forward(self, positions, inputs_embeds, kv_caches, meta) -> torch.Tensor:
        return self.model.decoder(positions, inputs_embeds, kv_caches, meta)

    def stage(self, items: list) -> None:
        """The log-mel features onto the model's device, in its dtype (pinned async copies)."""
        device, dtype = self.media_device_dtype()
        for item in items:
            features = item.data.get("input_features")
            if features is not None and (features.device != device or features.dtype != dtype):
                staged = copy_to(features, device).to(dtype)
                item.data = {**item.data, "input_features": staged}

    def encode(self, items: list) -> list[torch.Tensor]:
        self.stage(items)
        return self.audio.encode(items)


# The tiny checkpoint's special tokens, in id order after the BPE vocab: Whisper's task tokens,
# then <|notimestamps|> and the timestamp tokens (ids past it, as transformers expects).
WHISPER_LANGUAGES = ("en", "de", "fr")
NUM_TIMESTAMPS = 251  # <|0.00|> ... <|5.00|>: the tiny 5 s window
WHISPER_TOKENS = {
    "eos_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "sot": "<|startoftranscript|>",
    **{f"lang_{code}": f"<|{code}|>" for code in WHISPER_LANGUAGES},
    "translate": "<|translate|>",
    "transcribe": "<|transcribe|>",
    "startoflm": "<|startoflm|>",
    "startofprev": "<|startofprev|>",
    "nospeech": "<|nospeech|>",
    "notimestamps": "<|notimestamps|>",
    **{f"ts_{i}": f"<|{i * 0.02:.2f}|>" for i in range(NUM_TIMESTAMPS)},
}


def _tiny_whisper() -> TinyConfig:
    """Two encoder and two decoder layers of width 64 on a 5 s window of 16 mel bins (250
    encoder rows), 64 decoder positions."""

    def build(kwargs: dict, ids: dict):
        return WhisperConfig(
            vocab_size=kwargs["vocab_size"],
            num_mel_bins=16,
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            decoder_layers=2,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_source_positions=250,
            max_target_positions=64,
            decoder_start_token_id=ids["<|startoftranscript|>"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        )

    def make_model(hf_config, dtype):
        import transformers as tf

        return tf.WhisperForConditionalGeneration._from_config(hf_config, dtype=dtype)

    def write_extra(out, tokenizer) -> None:
        import transformers as tf

        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in WHISPER_TOKENS.values()}
        features = tf.WhisperFeatureExtractor(feature_size=16, chunk_length=5)
        tf.WhisperProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out)
        space = tokenizer.convert_tokens_to_ids("Ġ")
        generation = tf.GenerationConfig(
            decoder_start_token_id=ids["<|startoftranscript|>"],
            eos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=ids["<|endoftext|>"],
            max_length=64,
            is_multilingual=True,
            lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in WHISPER_LANGUAGES},
            task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
            no_timestamps_token_id=ids["<|notimestamps|>"],
            prev_sot_token_id=ids["<|startofprev|>"],
            # some ordinary tokens never spoken (a stand-in for Whisper's non-speech list) and
            # the task tokens; a blank and end-of-text never first
            suppress_tokens=[5, 9, 17, ids["<|startoftranscript|>"], ids["<|translate|>"]],
            begin_suppress_tokens=[space, ids["<|endoftext|>"]],
            max_initial_timestamp_index=50,
        )
        generation.save_pretrained(out)

    return TinyConfig(
        "WhisperForConditionalGeneration",
        build=build,
        make_model=make_model,
        write_extra=write_extra,
        tokens=WHISPER_TOKENS,
    )


TINY_CONFIGS = {"whisper": _tiny_whisper()}
