"""Tensors sent as base64 `torch.save` files (vLLM's embedding inputs): `/v1/completions`'
`prompt_embeds` (`--enable-prompt-embeds`), each `[num_tokens, hidden_size]`, and chat's
`image_embeds` parts (`--enable-mm-embeds`), read with `weights_only=True` (tensors only: no code
runs) onto the CPU. The engine checks the rest (shape, dtype, finite values, the model's hidden
size: processors/prompt_embeds.py)."""

from __future__ import annotations

import base64
import binascii
import io

import torch

from polymodal.server.errors import RequestError


def decode_prompt_embeds(values: str | list[str]) -> list[torch.Tensor]:
    """The tensors of `prompt_embeds` (one string or a list), each refused with a 400 naming
    it when it is not base64 of one saved tensor."""
    single = isinstance(values, str)
    items = [values] if single else list(values)
    if not items:
        raise RequestError("prompt_embeds must not be empty", "prompt_embeds")
    return [decode_tensor(v, "prompt_embeds" if single else f"prompt_embeds[{i}]")
            for i, v in enumerate(items)]  # fmt: skip


def decode_tensor(value: str, where: str) -> torch.Tensor:
    """One base64 `torch.save`d tensor (a 400 naming `where` when it is not one)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"{where} is not valid base64: {exc}", where) from None
    try:
        tensor = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # any malformed file: torch raises many kinds
        raise RequestError(
            f"{where} is not a tensor saved with torch.save: {type(exc).__name__}", where
        ) from None
    if not isinstance(tensor, torch.Tensor):
        raise RequestError(f"{where} holds a {type(tensor).__name__}, not a tensor", where)
    return tensor.to_dense() if tensor.layout != torch.strided else tensor
