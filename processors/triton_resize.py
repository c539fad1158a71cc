"""Antialiased uint8 resize on the GPU with the CPU kernel's integer arithmetic, bit for bit.

transformers' image processors resize with torchvision, which on the CPU takes torch's native
uint8 antialiased kernel (bicubic always, bilinear on AVX2 / AVX512 / arm64: Pillow's
fixed-point algorithm) but on a GPU goes through float32 and rounds, so the same image gives
pixels one level apart here and there depending on the device. This module ports the CPU
kernel instead, so an image resized on the model's GPU gives exactly the pixels of the
reference processor run as it runs by default (on the CPU):

- per output index along an axis, the taps of `HelperInterpBase::_compute_index_ranges_weights`
  (PIL's support and centering, Keys' cubic with a = -0.5 or the triangle, weights normalized
  in float64, summed in tap order) rounded to int16 at the largest precision under which the
  axis's largest weight fits (`_compute_index_ranges_int16_weights`; `axis_taps`);
- a width pass, then a height pass (each skipped when that side keeps its size), each output
  sample the integer dot product of its taps plus half an LSB, shifted down and clamped to
  0..255, the width pass's result kept as uint8 (`basic_loop_aa_horizontal<uint8_t>`, and the
  AVX version of it).

tests/processors/test_triton_resize.py checks it against `F.interpolate` on the CPU under
TRITON_INTERPRET=1; tests/processors/test_gpu_resize.py on CUDA.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 256
_CACHE_SIZE = 64  # axes kept on each device (a video's frames share two)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution with a = -0.5 (torch's antialiased bicubic, as PIL)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


FILTERS = {"bicubic": (4, _keys_cubic), "bilinear": (2, _triangle)}  # mode -> (interp size, fn)


def axis_taps(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, int]:
    """One axis's taps as int32 `[out_size, 2 + num_taps]` (first input index, taps used, then
    the int16 weights) and their precision in bits. float64 arithmetic in torch's order."""
    interp_size, filter_fn = FILTERS[mode]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    num_taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C++ casts truncate
    used = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    used = np.clip(used, 0, num_taps)
    weights = np.zeros((out_size, num_taps))
    total = np.zeros(out_size)
    for j in range(num_taps):  # one tap at a time: the sum in torch's order
        w = filter_fn(((j + first).astype(np.float64) - center + 0.5) * invscale)
        weights[:, j] = np.where(j < used, w, 0.0)
        total = total + weights[:, j]
    nonzero = total != 0.0
    weights[nonzero] /= total[nonzero, None]
    weights[~nonzero] = 0.0
    largest = float(weights.max()) if weights.size else 0.0
    precision = 22
    for bits in range(22):
        if int(0.5 + largest * (1 << (bits + 1))) >= 1 << 15:
            precision = bits
            break
    scaled = weights * (1 << precision)
    rounded = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5))
    table = np.concatenate([first[:, None], used[:, None], rounded], axis=1).astype(np.int32)
    return table, precision


_DEVICE_TAPS: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
_LOCK = threading.Lock()


def _taps_on(device: torch.device, in_size: int, out_size: int, mode: str):
    """`axis_taps` as a tensor on `device` (kept for the next frame or image of the size)."""
    from polymodal.llm_core.host_copy import copy_to

    key = (device, in_size, out_size, mode)
    with _LOCK:
        hit = _DEVICE_TAPS.get(key)
        if hit is not None:
            _DEVICE_TAPS.move_to_end(key)
            return hit
    table, precision = axis_taps(in_size, out_size, mode)
    entry = copy_to(torch.from_numpy(table), device), precision  # pinned + async on CUDA
    with _LOCK:
        _DEVICE_TAPS[key] = entry
        while len(_DEVICE_TAPS) > _CACHE_SIZE:
            _DEVICE_TAPS.popitem(last=False)
    return entry


# every size-dependent int: a new image size must not compile a kernel variant mid-run
_SIZE_ARGS = ["channels", "rows", "out_width", "out_rows", "width", "stride_n", "stride_c",
              "stride_h", "stride_w", "num_taps", "precision", "half"]  # fmt: skip


@triton.jit(do_not_specialize=[a for a in _SIZE_ARGS if a not in ("out_rows", "width")])
def _width_pass_kernel(
    src_ptr, dst_ptr, taps_ptr,
    channels, rows, out_width,
    stride_n, stride_c, stride_h, stride_w,
    num_taps, precision, half,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Program per (frame x channel x row, block of output columns); dst is contiguous
    `[N * C * rows, out_width]` uint8. Each column has its own taps (a gather along the row)."""
    pid = tl.program_id(0)
    row = pid % rows
    plane = pid // rows
    src = (
        src_ptr
        + (plane // channels).to(tl.int64) * stride_n
        + (plane % channels).to(tl.int64) * stride_c
        + row.to(tl.int64) * stride_h
    )
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < out_width
    tap_row = taps_ptr + cols * (2 + num_taps)
    first = tl.load(tap_row, mask=live, other=0)
    used = tl.load(tap_row + 1, mask=live, other=0)
    acc = tl.zeros([BLOCK], dtype=tl.int32) + half  # half an LSB: the shift rounds
    for k in range(num_taps):
        take = live & (k < used)
        pixel = tl.load(src + (first + k).to(tl.int64) * stride_w, mask=take, other=0)
        weight = tl.load(tap_row + 2 + k, mask=take, other=0)
        acc += pixel.to(tl.int32) * weight
    out = tl.minimum(tl.maximum(acc >> precision, 0), 255).to(tl.uint8)  # arithmetic shift
    tl.store(dst_ptr + pid.to(tl.int64) * out_width + cols, out, mask=live)


@triton.jit(do_not_specialize=[a for a in _SIZE_ARGS if a not in ("rows", "out_width")])
def _height_pass_kernel(
    src_ptr, dst_ptr, taps_ptr,
    channels, out_rows, width,
    stride_n, stride_c, stride_h, stride_w,
    num_taps, precision, half,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Program per (frame x channel x output row, block of columns); dst is contiguous
    `[N * C * out_rows, width]` uint8. The row's taps are scalars; each tap reads a row."""
    pid = tl.program_id(0)
    out_row = pid % out_rows
    plane = pid // out_rows
    src = (
        src_ptr
        + (plane // channels).to(tl.int64) * stride_n
        + (plane % channels).to(tl.int64) * stride_c
    )
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < width
    tap_row = taps_ptr + out_row * (2 + num_taps)
    first = tl.load(tap_row)
    used = tl.load(tap_row + 1)
    acc = tl.zeros([BLOCK], dtype=tl.int32) + half
    for k in range(num_taps):
        take = live & (k < used)
        weight = tl.load(tap_row + 2 + k)
        line = src + (first + k).to(tl.int64) * stride_h
        pixel = tl.load(line + cols.to(tl.int64) * stride_w, mask=take, other=0)
        acc += pixel.to(tl.int32) * weight
    out = tl.minimum(tl.maximum(acc >> precision, 0), 255).to(tl.uint8)
    tl.store(dst_ptr + pid.to(tl.int64) * width + cols, out, mask=live)


def _axis_pass(frames: torch.Tensor, out_size: int, mode: str, axis: int) -> torch.Tensor:
    """One pass along width (axis 3) or height (axis 2) of uint8 `[N, C, H, W]` frames (any
    strides) -> contiguous uint8 frames with that side `out_size`."""
    num, channels, height, width = frames.shape
    taps, precision = _taps_on(frames.device, frames.shape[axis], out_size, mode)
    num_taps = taps.shape[1] - 2
    kernel = _width_pass_kernel if axis == 3 else _height_pass_kernel
    shape = [num, channels, height, width]
    shape[axis] = out_size
    rows, cols = shape[2], shape[3]  # program rows (output rows), columns a row
    out = torch.empty(shape, dtype=torch.uint8, device=frames.device)
    if out.numel():
        grid = (num * channels * rows, triton.cdiv(cols, BLOCK))
        kernel[grid](
            frames, out, taps, channels, rows, cols, *frames.stride(), num_taps, precision,
            (1 << precision) >> 1,
            BLOCK=BLOCK,
        )  # fmt: skip
    return out


def resize_uint8(
    frames: torch.Tensor, size: tuple[int, int], mode: str = "bicubic"
) -> torch.Tensor:
    """uint8 `[N, C, H, W]` frames (any strides, on a CUDA device) resized to `size` (h, w) with
    antialiasing, equal bit for bit to torch's CPU `F.interpolate(..., antialias=True)` of them.
    Width first, then height, as the CPU kernel does; a side that keeps its size is not touched."""
    if frames.dtype != torch.uint8 or frames.dim() != 4:
        raise ValueError(f"resize_uint8 takes uint8 [N, C, H, W] frames, got {frames.dtype} "
                         f"{tuple(frames.shape)}")  # fmt: skip
    if mode not in FILTERS:
        raise ValueError(f"unsupported resize mode {mode!r}; expected one of {list(FILTERS)}")
    height, width = size
    if frames.shape[3] != width:
        frames = _axis_pass(frames, width, mode, axis=3)
    if frames.shape[2] != height:
        frames = _axis_pass(frames, height, mode, axis=2)
    return frames
