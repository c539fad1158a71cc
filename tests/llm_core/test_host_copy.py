"""Host -> device copies through the pinned ring (`llm_core/host_copy.py`)."""

from __future__ import annotations

import threading

import pytest
import torch

from polymodal.llm_core.host_copy import (
    PinnedRing,
    _widened,
    copy_to,
    host_tensor,
    upload,
    upload_tensors,
)


def test_cpu_targets_are_plain_moves():
    x = torch.arange(12).view(3, 4).t()  # a permuted view
    assert torch.equal(copy_to(x, torch.device("cpu")), x)
    a, b = upload([[1, 2, 3], [4]], torch.int32, torch.device("cpu"))
    assert a.tolist() == [1, 2, 3] and b.tolist() == [4]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32])
def test_upload_starts_every_part_on_16_bytes(dtype):
    """Kernels are specialized on their pointers' alignment: a part's offset must not move with
    the lengths of the parts before it."""
    parts = [[0, 1, 2], [3], [], [4, 5, 6, 7, 8], [9, 10]]
    views = upload(parts, dtype, torch.device("cpu"))
    assert [v.tolist() for v in views] == [[float(x) for x in p] for p in parts]
    assert all(v.dtype == dtype and v.data_ptr() % 16 == 0 for v in views)


def test_a_view_that_skips_pad_bytes_widens_to_its_dense_block():
    """RGB of RGBX pixels (`hashing.pixel_view`): copied as the dense `[..., 4]` block, never
    gathered on the host; other layouts are not widened."""
    rgbx = torch.arange(2 * 5 * 7 * 4, dtype=torch.int32).to(torch.uint8).view(2, 5, 7, 4)
    rgb = rgbx[..., :3]
    assert _widened(rgb).data_ptr() == rgbx.data_ptr() and torch.equal(_widened(rgb), rgbx)
    assert _widened(rgbx) is None  # dense already
    assert _widened(rgbx[:, ::2, :, :3]) is None  # rows skipped: not one block
    assert _widened(rgbx[..., 1:4]) is None  # its block would end past the storage
    assert torch.equal(_widened(rgbx[..., :2]), rgbx)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_rgb_of_rgbx_frames_copy_exactly():
    rgbx = torch.randint(0, 256, (3, 9, 11, 4), dtype=torch.uint8)
    frames = rgbx[..., :3].permute(0, 3, 1, 2)  # [T, 3, H, W] as the processors keep it
    moved = copy_to(frames, torch.device("cuda"))
    assert moved.shape == frames.shape and torch.equal(moved.cpu(), frames)


@pytest.mark.gpu
@cuda
def test_ring_reuses_its_bytes_only_after_the_copies_ran():
    """A 4 KiB ring lent far past its size while the stream is held up by a long kernel: every
    copy still lands intact (a byte reused before its copy ran would corrupt an earlier one),
    from two threads at once, with odd sizes and dtypes."""
    ring = PinnedRing(torch.device("cuda"), 4096)
    torch.cuda._sleep(50_000_000)  # the copies queue behind this
    results: dict = {}

    def lend(worker: int) -> None:
        for i in range(40):
            src = torch.randint(0, 1000, (i % 3 + 1, 37 + i), dtype=torch.int64)  # <= 1824 B
            src = src.to(torch.float16 if i % 2 else torch.int64)
            results[worker, i] = (src, ring.copy(src))

    threads = [threading.Thread(target=lend, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert len(results) == 80
    for src, out in results.values():
        assert out.is_cuda and out.dtype == src.dtype
        assert torch.equal(out.cpu(), src)


@pytest.mark.gpu
@cuda
def test_copy_to_cuda_keeps_the_view_order():
    hwc = torch.randint(0, 255, (5, 7, 3), dtype=torch.uint8)
    chw = hwc.permute(2, 0, 1)
    out = copy_to(chw, torch.device("cuda"))
    big = torch.randn(5 << 20)  # over a quarter of the ring: its own pinned copy
    assert torch.equal(out.cpu(), chw) and out.shape == chw.shape
    assert torch.equal(copy_to(big, torch.device("cuda")).cpu(), big)
    with pytest.raises(ValueError, match="ring"):
        PinnedRing(torch.device("cuda"), 1024).copy(torch.zeros(2048, dtype=torch.uint8))
    starts, lens, tables = upload([[0, 3, 5], [3, 2], [7, 8, 9]], torch.int32, torch.device("cuda"))
    assert [starts.tolist(), lens.tolist(), tables.tolist()] == [[0, 3, 5], [3, 2], [7, 8, 9]]
    assert all(t.is_cuda and t.data_ptr() % 16 == 0 for t in (starts, lens, tables))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.float16])
def test_host_tensor_converts_like_torch_tensor(dtype):
    """The buffer-protocol conversion gives what torch.tensor gives (dtypes without an array
    typecode, and values array refuses, take torch.tensor itself)."""
    for values in ([3, -1, 7], [], [0.5, 2.25] if dtype.is_floating_point else [True, 2]):
        got = host_tensor(values, dtype)
        assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype))
    assert host_tensor([1.5], torch.int64).tolist() == torch.tensor([1.5]).long().tolist()


def test_upload_tensors_is_one_aligned_buffer():
    parts = [torch.arange(3), torch.tensor([], dtype=torch.int64), torch.arange(5) * 7]
    views = upload_tensors(parts, torch.device("cpu"))
    assert [v.tolist() for v in views] == [p.tolist() for p in parts]
    assert all(v.data_ptr() % 16 == 0 for v in views)
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1  # one copy
