"""Load a vision tower from a checkpoint directory (config.json + safetensors)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from polymodal.llm_core.errors import ModelLoadError

# Prefixes the vision tower's tensors carry: transformers v4 checkpoints (`visual.`) and the v5
# in-memory naming (`model.visual.`). Longest first so `model.visual.` wins.
VISION_PREFIXES = ("model.visual.", "visual.")


def strip_vision_prefix(name: str) -> str | None:
    """`visual.blocks.0.x` / `model.visual.blocks.0.x` -> `blocks.0.x`; None for other tensors."""
    for prefix in VISION_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def vision_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Keep the vision tower's tensors of a checkpoint stream, with their prefix stripped."""
    for name, tensor in named_tensors:
        short = strip_vision_prefix(name)
        if short is not None:
            yield short, tensor


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, or every `*.safetensors`."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in checkpoint directory {model_dir}")
    return files


def read_vision_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Read only the vision tower's tensors of a checkpoint, prefixes stripped."""
    out: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                short = strip_vision_prefix(name)
                if short is not None:
                    out[short] = f.get_tensor(name)
    return out


def read_config(model_dir: str | Path) -> dict:
    """The checkpoint's config.json as a dict; ModelLoadError if absent or lacking vision_config."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ModelLoadError(f"no config.json in checkpoint directory {model_dir}")
    config = json.loads(path.read_text())
    if "vision_config" not in config:
        raise ModelLoadError(f"{path} has no vision_config: the model has no vision tower")
    return config


def load_encoder(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device="cpu", backend=None
):
    """Build the registered encoder for the checkpoint in `model_dir` and load its weights.

    The encoder class comes from `config.json`'s `architectures` (else `model_type`) through
    the encoder registry; it gets the `vision_config` dict, then the `visual.*` tensors.
    """
    from polymodal.encoders.registry import encoder_class_for_config

    config = read_config(model_dir)
    encoder = encoder_class_for_config(config).from_config(
        config["vision_config"], dtype=dtype, device=device, backend=backend
    )
    encoder.load_weights(read_vision_tensors(model_dir))
    return encoder
