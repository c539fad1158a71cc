"""Attention backends: one interface (store_kv / paged_attention / varlen_attention).

`get_backend(name)` picks one: "torch" (reference, any device), "triton" (CUDA default),
"flash" (flash-attn, when installed). "auto" = triton on CUDA, torch elsewhere.
"""

from __future__ import annotations

from polymodal.llm_core.attention.metadata import AttentionMetadata
from polymodal.llm_core.attention.torch_ref import TorchAttentionBackend

__all__ = ["AttentionMetadata", "TorchAttentionBackend", "get_backend"]


def get_backend(name: str = "auto", device: str = "cpu", sdpa_shapes: str = "second"):
    """Return an attention backend instance by name; `sdpa_shapes`: the Triton backend's policy
    for cuDNN SDPA shapes (`attention/sdpa_shapes.py`)."""
    if name == "auto":
        name = ("flash" if _flash_ok() else "triton") if str(device).startswith("cuda") else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        from polymodal.llm_core.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(sdpa_shapes=sdpa_shapes)
    if name == "flash":
        from polymodal.llm_core.attention.flash_backend import FlashAttnBackend

        return FlashAttnBackend()
    from polymodal.llm_core.errors import InvalidInputError

    raise InvalidInputError(
        f"unknown attention backend {name!r}; choose auto, torch, triton or flash"
    )


def _flash_ok() -> bool:
    from polymodal.llm_core.attention.flash_backend import flash_attn_available

    return flash_attn_available()
