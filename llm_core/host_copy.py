"""Host lists -> device tensors without stalling the host.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory and then waits for
the device's stream to drain, so every such call in a step makes the host wait for all work
queued before it. Here the values go through pinned memory with one asynchronous copy (the
caching host allocator keeps the pinned block until the copy has run), so the host can queue
the next step while the device is still busy with the last one.
"""

from __future__ import annotations

from itertools import chain

import torch


def upload(parts: list, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Each of `parts` (flat lists of numbers) as a 1-D `dtype` tensor on `device`, through a
    single copy. Views of one buffer: do not resize them."""
    sizes = [len(p) for p in parts]
    flat = torch.tensor(list(chain.from_iterable(parts)), dtype=dtype)
    if torch.device(device).type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return list(flat.split(sizes))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One flat list as a `dtype` tensor on `device`, without waiting for the device."""
    return upload([values], dtype, device)[0]


def copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; host -> CUDA through pinned memory and an async copy (no wait for
    the device's queued work). Other moves are plain `.to(device)` (a no-op when there).

    A permuted view (e.g. an HWC image seen as CHW) is copied in its memory order and permuted
    back on the device, so the host never transposes it."""
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))  # memory order
        inverse = sorted(range(tensor.dim()), key=order.__getitem__)
        stored = tensor.permute(order).contiguous()  # a no-op for a dense permuted view
        return stored.pin_memory().to(device, non_blocking=True).permute(inverse)
    return tensor.to(device)
