"""Host lists -> device tensors without stalling the host.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory and then waits for
the device's stream to drain, so every such call in a step makes the host wait for all work
queued before it. Here the values go through pinned memory with one asynchronous copy, so the
host can queue the next step while the device is still busy with the last one.

The pinned memory is one buffer per device handed out in turn (`PinnedRing`), not a
`pin_memory()` per copy: torch's caching host allocator took 0.14-10 ms (often ~3) to pin a
448x448 image's frames on an H200 host, most calls apparently a fresh page-locked allocation.
"""

from __future__ import annotations

import threading
from array import array
from collections import deque
from itertools import chain

import torch

RING_BYTES = 64 << 20  # captioning stages up to 64 images ahead (~0.6 MB of frames each)
ALIGN = 256


class PinnedRing:
    """A pinned host buffer lent out in turn to host -> device copies.

    A copy takes the next `nbytes` of the buffer (wrapping at the end), fills it and queues
    the copy on the current stream, then records an event; a later copy that needs the same
    bytes first waits for that event. The wait only happens when the device is a whole buffer
    behind the host. Thread-safe (media threads and the engine thread share it).
    """

    def __init__(self, device: torch.device, nbytes: int = RING_BYTES):
        self.device = torch.device(device)
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.head = 0
        self.in_flight: deque = deque()  # (start, end, event) in the order lent
        self.lock = threading.Lock()

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU `tensor` on the device (an async copy through the buffer)."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > self.buffer.numel():
            raise ValueError(f"{nbytes} bytes do not fit a {self.buffer.numel()}-byte pinned ring")
        with self.lock:
            start = self._reserve(nbytes)
            staged = self.buffer[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
            staged.copy_(tensor)
            out = staged.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.in_flight.append((start, start + nbytes, event))
        return out

    def _reserve(self, nbytes: int) -> int:
        """Start of `nbytes` free bytes at the head (waits for copies still reading them)."""
        while self.in_flight and self.in_flight[0][2].query():  # copies done: forget them
            self.in_flight.popleft()
        size = -(-nbytes // ALIGN) * ALIGN
        start = 0 if self.head + size > self.buffer.numel() else self.head
        end = start + size
        while any(s < end and start < e for s, e, _ in self.in_flight):
            self.in_flight.popleft()[2].synchronize()  # oldest first: the stream's order
        self.head = end
        return start


_RINGS: dict[torch.device, PinnedRing] = {}
_RINGS_LOCK = threading.Lock()


def _to_cuda(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Contiguous CPU `tensor` -> CUDA `device`, async, through the device's `PinnedRing`
    (tensors over a quarter of it take their own `pin_memory()`)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _RINGS_LOCK:
        ring = _RINGS.get(device)
        if ring is None:
            ring = _RINGS[device] = PinnedRing(device)
    if tensor.numel() * tensor.element_size() > ring.buffer.numel() // 4:
        return tensor.pin_memory().to(device, non_blocking=True)
    return ring.copy(tensor)


def upload(parts: list, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Each of `parts` (flat lists of numbers) as a 1-D `dtype` tensor on `device`, through a
    single copy. Views of one buffer: do not resize them.

    Each view starts on a 16-byte boundary (parts padded with zeros): Triton specializes a
    kernel on its pointers' 16-byte alignment, so an offset that moved with the batch's counts
    (the block tables after `num_seqs + 1` query starts) compiled a new kernel variant mid-run.
    """
    align = max(1, 16 // dtype.itemsize)
    padded = [-(-len(p) // align) * align for p in parts]
    pads = ([0] * (size - len(p)) for p, size in zip(parts, padded))
    values = list(chain.from_iterable(chain(p, pad) for p, pad in zip(parts, pads)))
    flat = host_tensor(values, dtype)
    if torch.device(device).type == "cuda":
        flat = _to_cuda(flat, device)
    else:
        flat = flat.to(device)
    return [view[: len(p)] for view, p in zip(flat.split(padded), parts)]


# array typecodes of the dtypes `host_tensor` converts through the buffer protocol
_TYPECODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d"}


def host_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """A flat list of numbers as a 1-D CPU `dtype` tensor. Through `array` (~15 ns a value)
    rather than `torch.tensor(list)` (~130 ns a value: 2 ms for a step of 16k tokens)."""
    code = _TYPECODES.get(dtype)
    if code is None or not values or array(code).itemsize != dtype.itemsize:
        return torch.tensor(values, dtype=dtype)
    try:
        return torch.frombuffer(array(code, values), dtype=dtype)
    except (TypeError, OverflowError):  # values array does not take: torch's own rules
        return torch.tensor(values, dtype=dtype)


def upload_tensors(parts: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Each of `parts` (1-D CPU tensors of one dtype) on `device` through a single copy, each
    view starting on a 16-byte boundary as in `upload`."""
    align = max(1, 16 // parts[0].dtype.itemsize)
    sizes = [-(-len(p) // align) * align for p in parts]
    flat = torch.zeros(sum(sizes), dtype=parts[0].dtype)
    for view, part in zip(flat.split(sizes), parts):
        view[: len(part)] = part
    flat = copy_to(flat, device)
    return [view[: len(p)] for view, p in zip(flat.split(sizes), parts)]


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One flat list as a `dtype` tensor on `device`, without waiting for the device."""
    return upload([values], dtype, device)[0]


def copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; host -> CUDA through pinned memory and an async copy (no wait for
    the device's queued work). Other moves are plain `.to(device)` (a no-op when there).

    A permuted view (e.g. an HWC image seen as CHW) is copied in its memory order and permuted
    back on the device, so the host never transposes it. A view whose innermost dim skips
    elements (the RGB of Pillow's RGBX pixels, `hashing.pixel_view`) is copied with them and
    sliced on the device: one dense copy, not a strided gather on the host."""
    if tensor.device.type == "cpu" and torch.device(device).type == "cuda":
        order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))  # memory order
        inverse = sorted(range(tensor.dim()), key=order.__getitem__)
        stored = tensor.permute(order)
        wide = _widened(stored)
        if wide is not None:
            return _to_cuda(wide, device)[..., : stored.shape[-1]].permute(inverse)
        return _to_cuda(stored.contiguous(), device).permute(inverse)  # (no-op when dense)
    return tensor.to(device)


def _widened(stored: torch.Tensor) -> torch.Tensor | None:
    """`stored` (in memory order) with its innermost dim widened to the next dim's stride, when
    that is a dense view of memory the tensor's storage holds (e.g. `[H, W, 3]` of `[H, W,
    4]` bytes), else None (dense already, or another layout)."""
    if stored.dim() < 2 or stored.is_contiguous() or stored.stride(-1) != 1 or not stored.numel():
        return None
    width = stored.stride(-2)
    if width <= stored.shape[-1]:
        return None
    shape = (*stored.shape[:-1], width)
    count = 1  # the stride each dim needs to be dense, then the widened element count
    for size, stride in zip(reversed(shape), reversed(stored.stride())):
        if size != 1 and stride != count:
            return None
        count *= size
    end = (stored.storage_offset() + count) * stored.element_size()
    if end > stored.untyped_storage().nbytes():
        return None
    return stored.as_strided(shape, stored.stride())
