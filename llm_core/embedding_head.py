"""The embedding models' head: sentence-transformers' modules after the transformer, as the
checkpoint declares them (`pooling_config.py`), on one prompt's final hidden states.

    pooled = concat(mode(hidden) for mode in modes)       [hidden * len(modes)]
    pooled = activation(dense(pooled)) ...                [each Dense's out_features]
    task embed: pooled[:dimensions] (Matryoshka), then L2-normalized (the checkpoint's
    Normalize module, or the request's `normalize`)

Pooling and the Dense projections run in float32 (sentence-transformers' reference runs the
checkpoint's dtype; float32 is at least as close to it as the model's own dtype).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.pooling_config import PoolingConfig, load_pooling_config

_ACTIVATIONS = {
    "Identity": nn.Identity,
    "Tanh": nn.Tanh,
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "Sigmoid": nn.Sigmoid,
    "SiLU": nn.SiLU,
}


def pool_mode(mode: str, hidden: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pooling `mode` over one prompt's `hidden [num_tokens, hidden]`
    (float32, no padding: every row is a real token) -> `[hidden]`."""
    if mode == "cls":
        return hidden[0]
    if mode == "lasttoken":
        return hidden[-1]
    if mode == "max":
        return hidden.max(0).values
    if mode == "mean":
        return hidden.sum(0) / hidden.shape[0]
    if mode == "mean_sqrt_len_tokens":
        return hidden.sum(0) / math.sqrt(hidden.shape[0])
    if mode == "weightedmean":  # token i (from 0) weighs i + 1
        weights = torch.arange(1, hidden.shape[0] + 1, device=hidden.device, dtype=hidden.dtype)
        return (hidden * weights[:, None]).sum(0) / weights.sum()
    raise ValueError(f"unknown pooling mode {mode!r}")


class EmbeddingHead(nn.Module):
    """Pooling modes, Dense projections (`dense.<i>.linear`, `.residual`: sentence-transformers'
    names) and the embed task's Matryoshka cut and normalization. `dimension`: the vector's
    size. The Dense weights come from the checkpoint's module folders (`checkpoint_tensors`)."""

    def __init__(self, config: PoolingConfig, hidden_size: int):
        super().__init__()
        self.config = config
        width = hidden_size * len(config.modes)
        self.dense = nn.ModuleList()
        self.activations = []
        for dense in config.dense:
            if dense.in_features != width:
                raise ModelLoadError(
                    f"{dense.folder / 'config.json'}: in_features={dense.in_features}, but the "
                    f"vector before it has {width} features"
                )
            layer = nn.Module()
            layer.linear = nn.Linear(width, dense.out_features, dense.bias, dtype=torch.float32)
            if dense.residual and dense.out_features != width:
                layer.residual = nn.Linear(width, dense.out_features, False, dtype=torch.float32)
            self.dense.append(layer)
            self.activations.append(_ACTIVATIONS[dense.activation]())
            width = dense.out_features
        self.dimension = width

    def checkpoint_tensors(self, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The Dense modules' tensors as `<prefix>dense.<i>.<name>`, from each module's folder
        (`model.safetensors`, else `pytorch_model.bin`)."""
        for i, dense in enumerate(self.config.dense):
            for name, tensor in _folder_tensors(dense.folder):
                yield f"{prefix}dense.{i}.{name}", tensor

    def forward(self, hidden: torch.Tensor, params) -> torch.Tensor:
        """One prompt's `hidden [num_tokens, hidden]` -> its vector `[dimension]` (task embed:
        cut to `params.dimensions`, normalized unless `params.normalize` is False; task encode:
        as the modules leave it)."""
        hidden = hidden.float()
        vector = torch.cat([pool_mode(mode, hidden) for mode in self.config.modes])
        for dense, layer, activation in zip(self.config.dense, self.dense, self.activations):
            out = activation(layer.linear(vector))
            if dense.residual:
                out = out + (layer.residual(vector) if hasattr(layer, "residual") else vector)
            vector = out
        if params.task != "embed":
            return vector
        if params.dimensions is not None:
            vector = vector[: params.dimensions]
        normalize = self.config.normalize if params.normalize is None else params.normalize
        return torch.nn.functional.normalize(vector, dim=-1) if normalize else vector


def embedding_head(model_dir, hidden_size: int, default: PoolingConfig) -> EmbeddingHead:
    """The head the checkpoint's sentence-transformers files declare (else `default`), logged."""
    pooling = load_pooling_config(model_dir, default)
    logging.getLogger("polymodal").info(
        "embedding pooling: %s, %d Dense, normalize=%s (from %s)",
        "+".join(pooling.modes), len(pooling.dense), pooling.normalize, pooling.source,
    )  # fmt: skip
    return EmbeddingHead(pooling, hidden_size)


def matryoshka_dimensions(text_config) -> tuple[bool, list[int] | None]:
    """(whether the model may be cut to fewer dimensions, the sizes it allows or None for
    any), from config.json's `matryoshka_dimensions` / `is_matryoshka` (vLLM's fields)."""
    sizes = getattr(text_config, "matryoshka_dimensions", None)
    allowed = bool(sizes) or bool(getattr(text_config, "is_matryoshka", False))
    return allowed, (list(sizes) if sizes else None)


def check_dimensions(
    dimensions: int | None, allowed: bool, sizes: list[int] | None, model: str, size: int | None
) -> None:
    """vLLM's rule for `dimensions`: only a Matryoshka model (config.json's
    `matryoshka_dimensions` or `is_matryoshka`) may cut its vectors, to one of its declared sizes
    when it lists them; InvalidInputError naming `dimensions` otherwise."""
    if dimensions is None:
        return
    if not allowed:
        raise InvalidInputError(
            f"dimensions: {model} does not support matryoshka representation (config.json has "
            "no matryoshka_dimensions nor is_matryoshka); leave dimensions unset"
        )
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise InvalidInputError(f"dimensions must be a positive integer, got {dimensions!r}")
    if sizes and dimensions not in sizes:
        raise InvalidInputError(
            f"dimensions={dimensions}: {model} supports the matryoshka dimensions {sizes} only"
        )
    if size is not None and dimensions > size:
        raise InvalidInputError(f"dimensions={dimensions} exceeds the embedding size {size}")


def _folder_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        yield from load_file(str(folder / "model.safetensors")).items()
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        yield from state.items()
    else:
        raise ModelLoadError(
            f"{folder}: no model.safetensors nor pytorch_model.bin (Dense weights)"
        )
