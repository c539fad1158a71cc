"""Decoder layers (linear, norm, rotary, activation, embedding-with-slots) and fused ops."""

from __future__ import annotations

_OPS: list = []


def fused_ops():
    """The fused Triton kernels module (`triton_ops.py`), or None where Triton is missing.

    Callers use it for CUDA tensors only; the torch path stays the CPU reference.
    """
    if not _OPS:
        try:
            from polymodal.llm_core.layers import triton_ops as module
        except ImportError:
            module = None
        _OPS.append(module)
    return _OPS[0]
