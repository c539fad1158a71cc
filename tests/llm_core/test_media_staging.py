"""`Qwen2VLForConditionalGeneration.stage`: the uint8 frames go to the model's device, and the
pixel values made there equal the host's patchify + normalize + cast, bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal import LLM
from polymodal.llm_core.models import qwen2_vl
from tests.helpers import tiny_checkpoint


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _rgba(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)


def _messages():
    video = [_image(56, 42, 10 + i) for i in range(4)]
    parts = [
        {"type": "image", "image": _image(90, 60, 0)},
        {"type": "image", "image": _image(84, 56, 1)},  # grid-sized: a permuted view, no resize
        {"type": "video", "video": video},
        {"type": "video", "video": [_rgba(56, 42, 20)] * 2},  # alpha-blended: float32 frames
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))


def _check_stage(llm, device, monkeypatch):
    model = llm.engine.runner.model
    dtype = model.lm_head.weight.dtype
    items = llm.processor.process(messages=_messages()).mm_items  # not staged yet
    assert [it.modality for it in items] == ["image", "image", "video", "video"]
    assert not items[1].data["pixel_frames"].is_contiguous()
    host = [it.pixel_values().to(dtype) for it in items]  # host normalize, then cast
    moved = []

    def copy_to(tensor, device):
        moved.append(tensor.dtype)
        return original(tensor, device)

    original = qwen2_vl.copy_to
    monkeypatch.setattr(qwen2_vl, "copy_to", copy_to)
    model.stage(items)
    # only the frames cross to the device: uint8, float32 where alpha was blended
    assert moved == [torch.uint8] * 3 + [torch.float32]
    for it, ref in zip(items, host):
        assert set(it.data) == {"pixel_values", "grid_thw"}
        staged = it.data["pixel_values"]
        assert staged.device.type == device and staged.dtype == dtype
        assert torch.equal(staged.cpu(), ref)
    before = [it.data["pixel_values"] for it in items]
    model.stage(items)  # idempotent: nothing moved, the same tensors kept
    assert len(moved) == 4 and all(a is it.data["pixel_values"] for a, it in zip(before, items))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stage_normalizes_uint8_patches_like_the_host(ckpt, dtype, monkeypatch):
    llm = LLM(ckpt, dtype=dtype, device="cpu", num_kv_blocks=64)
    _check_stage(llm, "cpu", monkeypatch)


@pytest.mark.gpu
def test_stage_on_cuda_matches_host_bitwise(ckpt, monkeypatch):
    llm = LLM(ckpt, dtype="bfloat16", device="cuda", num_kv_blocks=64)
    _check_stage(llm, "cuda", monkeypatch)


def test_stage_takes_already_normalized_pixels(ckpt):
    """Items carrying float `pixel_values` (a custom processor's) are cast and moved as is."""
    llm = LLM(ckpt, dtype="bfloat16", device="cpu", num_kv_blocks=64)
    item = llm.processor.process(messages=_messages()).mm_items[0]
    pixels = item.pixel_values()
    item.set_pixel_values(pixels)
    assert set(item.data) == {"pixel_values", "grid_thw"}
    llm.engine.runner.model.stage([item])
    assert torch.equal(item.data["pixel_values"], pixels.to(torch.bfloat16))
