"""On CUDA: LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision / Pixtral / Gemma 3 images staged on the
GPU (resize, pad, tiles or crops and normalize there, `llava_views`) give the host route's pixel
values bit for bit, at the released checkpoints' settings (336 / 384 / 1024 / 896 px, the 7Bs'
pinpoints, pan-and-scan) from 448 px to 12 MP,
with the same token ids; and greedy tokens of the tiny models do not depend on the route.
(The host route is the one test_llava_processor.py / test_llava_onevision_processor.py hold to
transformers.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal import LLM, SamplingParams
from polymodal.llm_core.host_copy import copy_to
from polymodal.processors.gemma3 import Gemma3Processor
from polymodal.processors.llava import LlavaNextProcessor, LlavaProcessor
from polymodal.processors.llava_onevision import LlavaOnevisionProcessor
from polymodal.processors.pixtral import PixtralProcessor
from tests.helpers import tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CONFIGS = Path(__file__).resolve().parents[2] / "sdk" / "configs"
# (width, height): 448 px, 1080p, 12 MP, extreme aspect ratios, tiny, odd
SIZES = [(448, 448), (1920, 1080), (4000, 3000), (3000, 4000), (2000, 150), (9, 50), (799, 601)]
LLAVA_336 = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
VARIANTS = {  # name -> (tiny arch, image processor settings: a shipped config or overrides)
    "llava_next_7b": ("llava_next", "llava_next_7b"),
    "llava_onevision_7b": ("llava_onevision", "llava_onevision_7b"),
    "llava@336": ("llava", LLAVA_336),
    "llava_padded@336": ("llava", {**LLAVA_336, "do_pad": True}),
    "pixtral_12b": ("pixtral", "pixtral_12b"),
    "gemma3@896": ("gemma3_vl", {"size": {"height": 896, "width": 896}}),
}
PROCESSORS = {
    "llava": LlavaProcessor,
    "llava_next": LlavaNextProcessor,
    "llava_onevision": LlavaOnevisionProcessor,
    "pixtral": PixtralProcessor,
    "gemma3_vl": Gemma3Processor,
}


def _photo(width, height, seed=0):
    import skimage.data

    rng = np.random.default_rng(seed)
    base = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(base).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _released(tmp_path_factory, name):
    """A tiny checkpoint's tokenizer with the released image processor settings."""
    arch, settings = VARIANTS[name]
    path = tmp_path_factory.mktemp(name.replace("@", "_"))
    shutil.copytree(tiny_checkpoint(tmp_path_factory, arch), path, dirs_exist_ok=True)
    if isinstance(settings, str):  # a shipped 7B's processor config
        shutil.copy(CONFIGS / settings / "processor_config.json", path / "processor_config.json")
    else:
        config = json.loads((path / "processor_config.json").read_text())
        config["image_processor"].update(settings)
        if arch == "llava":
            config["image_processor"]["patch_size"] = config["patch_size"] = 14
        (path / "processor_config.json").write_text(json.dumps(config))
    return PROCESSORS[arch].from_pretrained(path, processed_cache_mb=0)


def _stage(items, dtype):
    device = torch.device("cuda", torch.cuda.current_device())
    for item in items:
        item.stage(device, dtype, partial(copy_to, device=device))
    return [item.data["pixel_values"] for item in items]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_on_cuda_equals_host_route(tmp_path_factory, name, dtype):
    proc = _released(tmp_path_factory, name)
    tag = proc.placeholder
    for width, height in SIZES:
        image = _photo(width, height)
        prompts = [(tag, [image], {})]
        if name == "llava_onevision_7b":  # one of several images: one squared view each
            prompts.append((tag * 2, [image, _photo(height, width, 1)], {}))
        if name.startswith("gemma3"):  # pan-and-scan crops (none for a square image)
            prompts.append((tag, [image], {"do_pan_and_scan": True}))
        for prompt, images, options in prompts:
            host = proc.process(prompt=prompt, images=images, **options)
            device = proc.process(prompt=prompt, images=images, **options)
            assert device.token_ids == host.token_ids
            expected = [item.pixel_values(dtype) for item in host.mm_items]
            for got, ref in zip(_stage(device.mm_items, dtype), expected):
                assert got.is_cuda and got.dtype == dtype and got.shape == ref.shape
                assert torch.equal(got.cpu(), ref), (name, width, height, prompt)


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_onevision", "pixtral", "gemma3_vl"])
def test_greedy_tokens_do_not_depend_on_where_the_pixels_were_made(tmp_path_factory, arch):
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, arch)), dtype="float32", device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    images = [_photo(640, 480), _photo(90, 300, 1)]
    routes = {}
    for route in ("gpu", "host"):
        for image in images:
            prompt = llm.processor.placeholder + "\nDescribe."
            p = llm.processor.process(prompt=prompt, images=[image])
            if route == "host":  # pixel values made on the host, then only moved
                p.mm_items = [
                    dataclasses.replace(it, content_hash=it.content_hash + "/host")  # no cache hit
                    for it in p.mm_items
                ]
                for it in p.mm_items:
                    assert it.data["pixel_frames"].device.type == "cpu"  # not staged yet
                    it.set_pixel_values(it.pixel_values())
            llm.engine.runner.model.stage(p.mm_items)
            routes[route, image.size] = llm.engine.add_processed(p, params)
    final = llm.engine.run_until_done()
    for image in images:
        gpu, host = final[routes["gpu", image.size]], final[routes["host", image.size]]
        assert gpu.outputs[0].token_ids == host.outputs[0].token_ids


@pytest.mark.parametrize("name", ["gemma3@896", "pixtral_12b", "llava_next_7b", "llava_padded@336"])
def test_staging_never_waits_for_the_device(tmp_path_factory, name):
    """Staging an image (upload, resize, pad, views, normalize) only queues device work: a wait
    there (mean, std and the pad colour copied from pageable memory did) makes a staging thread
    wait for every step the engine queued, and a lone prompt's TTFT for its own upload and
    resize."""
    proc = _released(tmp_path_factory, name)
    warm = proc.process(prompt=proc.placeholder, images=[_photo(640, 480)])
    _stage(warm.mm_items, torch.bfloat16)  # this size's taps on the device, kernels compiled
    image = _photo(640, 480, 1)
    expected = proc.process(prompt=proc.placeholder, images=[image]).mm_items[0]
    items = proc.process(prompt=proc.placeholder, images=[image]).mm_items
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _stage(items, torch.bfloat16)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got.cpu(), expected.pixel_values(torch.bfloat16))
