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


def sentence_transformers_files(
    mode: str | tuple[str, ...],
    normalize: bool = True,
    dense: tuple[tuple[int, str], ...] = (),
    max_seq_length: int = 128,
    do_lower_case: bool = False,
):
    """`write_extra` of a tiny checkpoint in sentence-transformers' layout, as the hub's
    embedding checkpoints have it: modules.json (Transformer at the root, Pooling in 1_Pooling
    with the legacy `pooling_mode_*` flags, each Dense in 2_Dense, 3_Dense, ... with random
    weights: `dense` = ((out_features, torch.nn activation name), ...), Normalize last) and
    sentence_bert_config.json."""

    def write(out_dir, tokenizer) -> None:
        import json
        from pathlib import Path

        import torch
        from safetensors.torch import save_file

        out, st = Path(out_dir), "sentence_transformers.models."
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
        modules = [{"idx": 0, "name": "0", "path": "", "type": st + "Transformer"}]
        folders = [("1_Pooling", "Pooling")]
        folders += [(f"{i + 2}_Dense", "Dense") for i in range(len(dense))]
        folders += [(f"{len(dense) + 2}_Normalize", "Normalize")] if normalize else []
        for i, (path, kind) in enumerate(folders, 1):
            modules.append({"idx": i, "name": str(i), "path": path, "type": st + kind})
            (out / path).mkdir(exist_ok=True)
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
        hidden = json.loads((out / "config.json").read_text())["hidden_size"]
        legacy = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens",
                  "mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "weightedmean": "weightedmean_tokens", "lasttoken": "lasttoken"}  # fmt: skip
        flags = {f"pooling_mode_{name}": m in modes for m, name in legacy.items()}
        pooling = {"word_embedding_dimension": hidden, **flags}
        (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
        width = hidden * len(modes)
        generator = torch.Generator().manual_seed(1)
        for (path, _), (size, activation) in zip(folders[1:], dense):
            config = {"in_features": width, "out_features": size, "bias": True,
                      "activation_function": _torch_class(activation)}  # fmt: skip
            (out / path / "config.json").write_text(json.dumps(config))
            weight = torch.randn(size, width, generator=generator) / width**0.5
            bias = torch.randn(size, generator=generator) * 0.1
            save_file(
                {"linear.weight": weight, "linear.bias": bias},
                str(out / path / "model.safetensors"),
            )
            width = size
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": do_lower_case})
        )

    return write


def bge_m3_heads(seed: int = 2):
    """`write_extra` of a tiny checkpoint: random `sparse_linear.pt` and `colbert_linear.pt`
    in BAAI/bge-m3's layout (state dicts of a Linear hidden -> 1 and hidden -> hidden)."""

    def write(out_dir, tokenizer) -> None:
        import json
        from pathlib import Path

        import torch

        out = Path(out_dir)
        hidden = json.loads((out / "config.json").read_text())["hidden_size"]
        generator = torch.Generator().manual_seed(seed)
        for name, size in (("sparse_linear", 1), ("colbert_linear", hidden)):
            state = {
                "weight": torch.randn(size, hidden, generator=generator) / hidden**0.5,
                "bias": torch.randn(size, generator=generator) * 0.1,
            }
            torch.save(state, out / f"{name}.pt")

    return write


def both(*writers):
    """One `write_extra` running each of `writers` in turn."""

    def write(out_dir, tokenizer) -> None:
        for writer in writers:
            writer(out_dir, tokenizer)

    return write


def _torch_class(activation: str) -> str:
    """The full name sentence-transformers saves for a torch.nn activation class."""
    module = "linear" if activation == "Identity" else "activation"
    return f"torch.nn.modules.{module}.{activation}"
