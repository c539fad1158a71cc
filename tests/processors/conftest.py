"""Shared fixtures: tiny Qwen2-VL / Qwen2.5-VL checkpoints, real photographs, a small video."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "1")

ARCHS = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """arch -> directory of a tiny random checkpoint with tokenizer and HF processor configs."""
    from polymodal.demo_model import write_demo_checkpoint

    root = tmp_path_factory.mktemp("qwen_ckpts")
    return {arch: str(write_demo_checkpoint(root / arch, arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def hf_processors(checkpoints):
    """arch -> transformers `AutoProcessor` (the reference) of that checkpoint."""
    from transformers import AutoProcessor

    return {arch: AutoProcessor.from_pretrained(path) for arch, path in checkpoints.items()}


@pytest.fixture(scope="session")
def our_processors(checkpoints):
    """arch -> `QwenVLProcessor` of that checkpoint."""
    from polymodal.processors import QwenVLProcessor

    return {arch: QwenVLProcessor.from_pretrained(path) for arch, path in checkpoints.items()}


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photographs shipped with scikit-image and matplotlib, in several PIL modes."""
    import matplotlib.cbook
    import skimage.data

    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))
    hopper.load()
    astronaut = Image.fromarray(skimage.data.astronaut())
    coffee = Image.fromarray(skimage.data.coffee())
    # RGBA with a real alpha gradient, so "drop alpha" and "blend alpha" would differ
    alpha = np.linspace(0, 255, coffee.width, dtype=np.uint8)[None].repeat(coffee.height, 0)
    rgba = coffee.copy()
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "astronaut": astronaut,  # 512x512 RGB
        "coffee": coffee,  # 600x400 RGB
        "chelsea": Image.fromarray(skimage.data.chelsea()),  # 451x300 RGB
        "camera": Image.fromarray(skimage.data.camera()),  # 512x512 L (grayscale)
        "hopper": hopper,  # 512x600 JPEG
        "coffee_rgba": rgba,
        "chelsea_palette": Image.fromarray(skimage.data.chelsea()).convert("P"),
        "rocket_tall": Image.fromarray(skimage.data.rocket()).resize((90, 427)),
        "astronaut_wide": astronaut.resize((700, 120)),
        "tiny": coffee.resize((20, 13)),
    }


@pytest.fixture(scope="session")
def video_file(tmp_path_factory) -> str:
    """A 36-frame 12 fps 120x88 H.264 clip of a moving photograph, written with PyAV."""
    import av
    import skimage.data

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    base = np.asarray(Image.fromarray(skimage.data.chelsea()).resize((240, 160)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 120, 88, "yuv420p"
        for i in range(36):
            frame = np.ascontiguousarray(base[i : i + 88, 2 * i : 2 * i + 120])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def reference_blends_alpha() -> bool:
    """Whether the installed transformers composites transparent images onto white (5.24) or
    drops the alpha (5.17). Ours follows the newer behaviour."""
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
    return np.asarray(convert_to_rgb(clear)).reshape(-1)[:3].tolist() == [255, 255, 255]


def as_reference_sees(image):
    """`image` as the newer reference reads it: with an older transformers (which drops alpha),
    the white-composited RGB image, so both versions are compared against the same maths."""
    from polymodal.processors.media import to_rgb

    transparent = "A" in image.getbands() or image.info.get("transparency") is not None
    return to_rgb(image) if transparent and not reference_blends_alpha() else image
