"""Tiny random checkpoints, declared next to each model: every model file lists its
`TINY_CONFIGS` (demo name -> `TinyConfig`), which `polymodal.demo_model` writes for the demo
and the tests (no per-architecture branches there)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Shapes shared by every tiny text model: 2 layers, hidden 64, GQA 4 query / 2 kv heads.
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)


@dataclass(frozen=True)
class TinyConfig:
    """A tiny random checkpoint of one architecture.

    `config`: overrides of `TINY_TEXT` (and of the tokenizer-derived vocab / special ids).
    `build(kwargs, token_ids)`: the transformers config from those kwargs and the tokenizer's
    special token ids; default: the architecture's transformers class's `config_class(**kwargs)`.
    `make_model(hf_config, dtype)`: the module whose random weights are saved; default: the
    transformers class of the architecture (`from_config`).
    `write_extra(out_dir, tokenizer)`: more files (an HF processor's configs, ...).
    `tokens`: extra special tokens of the tiny tokenizer, by role (`{"boi_token":
    "<start_of_image>", ...}`: the tokenizer gets them as attributes, as a family's real one
    does); `"bos_token"` / `"eos_token"` set those. `chat_template`: the family's (default: the
    ChatML template with Qwen's media markers).
    """

    architecture: str
    config: dict = field(default_factory=dict)
    build: Callable[[dict, dict], Any] | None = None
    make_model: Callable[[Any, Any], Any] | None = None
    write_extra: Callable[[Any, Any], None] | None = None
    tokens: dict = field(default_factory=dict)
    chat_template: str | None = None
