"""Weight memory and KV-cache memory at a context length, from an architecture's config.json
alone (the model is built on the meta device: no weights, no GPU). docs/models.md's memory
columns come from here.

    python scripts/model_memory.py sdk/configs/gemma_3_12b [--tokens 32768] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from polymodal.llm_core.attention import get_backend
from polymodal.llm_core.config import load_config
from polymodal.llm_core.kv_cache_spec import plan_layout
from polymodal.llm_core.registry import encoder_class, model_class


def memory(model_dir: str, tokens: int, dtype: str, block_size: int = 16) -> dict:
    """{"params", "weights_gib", "kv_gib", "kv_tokens_per_layer"} for one request of `tokens`
    in decode (windowed layers hold their window, rounded up to whole blocks)."""
    cfg = load_config(model_dir, dtype)
    cls = model_class(cfg.architecture)
    extra = {"tower": encoder_class(cfg.architecture)} if encoder_class(cfg.architecture) else {}
    default = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device("meta"):
            model = cls(cfg, get_backend("torch"), 16, **extra)
    finally:
        torch.set_default_dtype(default)
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    weight_bytes = sum(params.values()) * cfg.dtype.itemsize
    layout = plan_layout(model.kv_cache_specs())
    held = kv_elements = 0
    for g, group in enumerate(layout.groups):
        blocks = group.spec.max_blocks(tokens, block_size, 1)  # decode: one token a step
        held += blocks * block_size * len(group.layers)
        kv_elements += blocks * block_size * layout.token_elements(g)
    kv_bytes = kv_elements * cfg.dtype.itemsize
    num_layers = max(1, len(layout.layer_slot))
    return {
        "architecture": cfg.architecture,
        "params": sum(params.values()),
        "weights_gib": weight_bytes / 2**30,
        "kv_gib": kv_bytes / 2**30,
        "kv_tokens_per_layer": held / num_layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    for model_dir in args.model_dirs:
        m = memory(model_dir, args.tokens, args.dtype)
        print(
            f"{m['architecture']:36s} {m['params'] / 1e9:7.2f}B params  weights "
            f"{m['weights_gib']:7.2f} GiB  KV for {args.tokens} tokens {m['kv_gib']:6.2f} GiB "
            f"({m['kv_tokens_per_layer']:.0f} tokens/layer on average)"
        )


if __name__ == "__main__":
    main()
