"""On CUDA: the GPU resize gives torch's CPU pixels bit for bit at the sizes that matter (448 px
to 12 MP), items staged on the GPU equal the host route's pixel values, and greedy tokens do not
depend on where the resize ran. (The kernel's arithmetic on CPU: test_triton_resize.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from polymodal import LLM, SamplingParams
from tests.helpers import tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BOUNDS = {"min_pixels": 3136, "max_pixels": 12845056}  # Qwen2.5-VL-7B's
SMALL = {"min_pixels": 3136, "max_pixels": 28 * 28 * 256}  # a prompt within 2048 positions

RESIZES = [
    ((1080, 1920), (1092, 1932)),  # 1080p at the 7B's bounds
    ((2160, 3840), (2156, 3836)),  # 4K
    ((3000, 4000), (2996, 4004)),  # 12 MP
    ((4000, 3000), (588, 448)),  # 12 MP to a small budget: ~6.7x down, 29 taps a side
    ((13, 20), (56, 84)),  # upscaled to min_pixels
    ((601, 799), (588, 812)),  # odd
]


@pytest.mark.parametrize("src,size", RESIZES)
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_cuda_resize_equals_cpu_kernel(src, size, mode):
    from polymodal.processors.triton_resize import resize_uint8

    gen = torch.Generator().manual_seed(src[0])
    hwc = torch.randint(0, 256, (*src, 3), dtype=torch.uint8, generator=gen)
    frames = hwc.permute(2, 0, 1)[None]  # decoded HWC seen as CHW
    ref = F.interpolate(frames, size, mode=mode, antialias=True, align_corners=False)
    got = resize_uint8(frames.cuda(), size, mode)
    assert torch.equal(got.cpu(), ref)
    video = frames.expand(3, -1, -1, -1).contiguous().cuda()  # frames of a video, contiguous
    assert torch.equal(resize_uint8(video, size, mode).cpu(), ref.expand(3, -1, -1, -1))


def _photo(width, height, mode="RGB", seed=0):
    import skimage.data

    rng = np.random.default_rng(seed)
    base = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(base).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(np.full((height, width), 128, dtype=np.uint8)))
    return image.convert(mode)


def _messages():
    video = [_photo(150, 101, seed=i).rotate(5 * i) for i in range(5)]  # odd: last repeated
    parts = [
        {"type": "image", "image": _photo(1920, 1080)},
        {"type": "image", "image": _photo(1001, 667, "RGBA")},
        {"type": "image", "image": _photo(799, 601, "L")},
        {"type": "image", "image": _photo(448, 448)},  # grid-sized: no resize
        {"type": "video", "video": video},
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2_5_vl"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_staged_on_cuda_equals_host_route(ckpt, dtype):
    llm = LLM(ckpt, dtype=dtype, device="cuda", num_kv_blocks=512)
    model = llm.engine.runner.model
    items = llm.processor.process(messages=_messages(), **BOUNDS).mm_items
    host = [it.pixel_values() for it in items]  # resized and normalized on the host
    grids = [it.data["grid_thw"].clone() for it in items]
    model.stage(items)  # resized on the GPU
    for it, ref, grid in zip(items, host, grids):
        assert torch.equal(it.data["grid_thw"], grid)
        staged = it.data["pixel_values"]
        assert staged.is_cuda and staged.shape == ref.shape
        assert torch.equal(staged.cpu(), ref.to(staged.dtype))


def test_greedy_tokens_do_not_depend_on_where_the_resize_ran(ckpt):
    llm = LLM(ckpt, dtype="float32", device="cuda", num_kv_blocks=2048)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    routes = {}
    for route in ("gpu", "host"):
        p = llm.processor.process(messages=_messages(), **SMALL)  # every image downscaled
        if route == "host":  # pixel values made on the host, then only moved
            p.mm_items = [
                dataclasses.replace(it, content_hash=it.content_hash + "/host")  # no cache hit
                for it in p.mm_items
            ]
            for it in p.mm_items:
                it.set_pixel_values(it.pixel_values())
        llm.engine.runner.model.stage(p.mm_items)
        routes[route] = llm.engine.add_processed(p, params)
    final = llm.engine.run_until_done()
    assert final[routes["gpu"]].outputs[0].token_ids == final[routes["host"]].outputs[0].token_ids
