"""Tests of kernels' sm_90 code (compiled offline by `scripts/kernel_sass.py`: triton's own
ptxas, no GPU): `largest_loop(kernel, const, types)` and a skip without triton's CUDA backend."""

import importlib.util
from pathlib import Path

import pytest
import triton

_spec = importlib.util.spec_from_file_location(
    "kernel_sass", Path(__file__).resolve().parents[2] / "scripts" / "kernel_sass.py"
)
_kernel_sass = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kernel_sass)


def largest_loop(kernel: str, const: dict, types: dict, warps: int = 4, using=()):
    """(instructions, spill accesses, opcode counts) of the kernel's largest loop on sm_90 (of
    those with any of the opcodes `using`, if given)."""
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no CUDA backend")
    return _kernel_sass.largest_loop(kernel, const, types, warps, using)


def compiled(kernel: str, const: dict, types: dict, warps: int = 4):
    """(registers a thread, each loop's (instructions, spill accesses, opcode counts)) on
    sm_90."""
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no CUDA backend")
    return _kernel_sass.compiled(kernel, const, types, warps)
