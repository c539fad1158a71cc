"""Programmatic dependent launch (PDL) for the Triton kernels on Hopper and newer GPUs.

A kernel launched with PDL may start while the kernel before it on the stream is still running.
Each such kernel (a) loads only data nothing earlier writes (weights) before `wait()`,
(b) calls `wait()` in every program before it reads or writes anything else: the instruction
blocks until the previous kernel has finished and its writes are visible, and (c) calls
`launch_dependents()` right after, which lets the next PDL kernel start its own launch and
prologue now instead of after this kernel's tail. Batch-1 decode is ~250 short kernels per
step, so the launch gaps and ramp-ups this hides are a measurable share of the step.

Correctness holds by induction: every PDL kernel waits in every program, so a kernel that
finished implies the one before it finished. Kernels without PDL (torch, cuBLAS) keep plain
stream order, and CUDA graphs capture the programmatic edges as they are.

`use_pdl(tensor)` is what a launch passes as `launch_pdl=` and as the kernel's `USE_PDL`
constexpr; it is False off CUDA (the interpreter has no `griddepcontrol`), before sm_90, or
when switched off (`POLYMODAL_PDL=0` or `set_enabled(False)`, for A/B benchmarks).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # a Triton without grid dependency control: never called (USE_PDL False)
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


_STATE = {"enabled": os.environ.get("POLYMODAL_PDL", "1") != "0"}


def set_enabled(flag: bool) -> None:
    """Switch PDL on or off for launches from now on (graphs captured earlier keep theirs)."""
    _STATE["enabled"] = bool(flag)


def is_enabled() -> bool:
    return _STATE["enabled"]


@functools.lru_cache(maxsize=8)
def _supported(device: torch.device) -> bool:
    if not HAVE_GDC or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def use_pdl(tensor: torch.Tensor) -> bool:
    """Whether kernels launched on `tensor`'s device take PDL now."""
    return _STATE["enabled"] and _supported(tensor.device)


@triton.jit
def wait(USE_PDL: tl.constexpr):
    """Block until the previous kernel finished, then let the next one launch (no-op off PDL)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
