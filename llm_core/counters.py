"""Arrival counters for kernels whose last program to finish a tile does the final reduction
(split-K GEMV, split-KV decode attention): one fused launch instead of a kernel plus a reduce.

A kernel adds 1 to its tile's counter after writing its partial result; the program that sees
`splits - 1` sums all partials and sets the counter back to 0, so the buffer is all zeros
between launches (and between CUDA-graph replays). Launches on one stream run one after the
other (under PDL too: a kernel touches counters only after its wait), so they share one buffer;
concurrent launches on two streams would not be safe.
"""

from __future__ import annotations

import torch

MAX_COUNTERS = 1 << 16
_BUFFERS: dict = {}


def arrival_counters(device: torch.device, needed: int) -> torch.Tensor:
    """The device's zeroed int32 counters (allocated on first use, before any graph capture:
    the engine warms every kernel up first). Raises if a launch needs more than exist."""
    if needed > MAX_COUNTERS:
        raise ValueError(f"a launch needs {needed} arrival counters; at most {MAX_COUNTERS}")
    if device not in _BUFFERS:
        _BUFFERS[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _BUFFERS[device]
