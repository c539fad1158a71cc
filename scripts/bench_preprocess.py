"""Host time to preprocess one request's media with the Qwen2.5-VL-7B processor settings:
its items one after another vs side by side (`processors/item_pool.py`).

Writes 1080p JPEGs and a 1280x720 H.264 clip (from scikit-image photographs), a checkpoint
folder with the shipped config and a Qwen-id tokenizer, then times `process()` with the
processed-input cache off:

    python scripts/bench_preprocess.py [--images 8] [--videos 2] [--frames 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polymodal.processors import item_pool, qwen_vl

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def write_media(out: Path, images: int) -> tuple[list[Path], Path]:
    import av
    import skimage.data

    rng = np.random.default_rng(0)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    paths = []
    for i in range(images):
        photo = Image.fromarray(photos[i % 3]).resize((1920, 1080), Image.BICUBIC)
        noisy = np.asarray(photo).astype(np.int16) + rng.integers(-6, 7, (1080, 1920, 3))
        paths.append(out / f"image{i}.jpg")
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(paths[-1], quality=90)
    clip = out / "clip.mp4"
    base = np.asarray(Image.fromarray(photos[0]).resize((1400, 800)))
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 1280, 720, "yuv420p"
        for i in range(150):  # 5 s, a slow pan
            frame = np.ascontiguousarray(base[i % 80 : i % 80 + 720, i % 120 : i % 120 + 1280])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return paths, clip


def timed(proc, request: dict, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of `proc.process(**request)` per mode, the modes alternating each round
    (the machine is shared: a slow spell hits both alike)."""
    runs = {"one by one": lambda jobs: [job() for job in jobs], "side by side": item_pool.run_items}
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for round_ in range(repeats + 1):  # the first round warms up
        for mode, run_items in runs.items():
            qwen_vl.run_items = run_items
            start = time.perf_counter()
            proc.process(**request)
            if round_:
                times[mode].append((time.perf_counter() - start) * 1e3)
    qwen_vl.run_items = item_pool.run_items
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from polymodal.bench.checkpoint import write_user_checkpoint

    out = Path(tempfile.mkdtemp())
    images, clip = write_media(out, args.images)
    ckpt = write_user_checkpoint(ROOT / "sdk" / "configs" / "qwen2_5_vl_7b", out / "ckpt")
    proc = qwen_vl.QwenVLProcessor.from_pretrained(ckpt, processed_cache_mb=0)
    cases = {
        f"{args.images} x 1080p JPEG": dict(prompt=IMAGE * args.images, images=images),
        f"{args.videos} x {args.frames}-frame 720p video": dict(
            prompt=VIDEO * args.videos, videos=[clip] * args.videos, num_frames=args.frames
        ),
        f"1 x {args.frames}-frame 720p video": dict(
            prompt=VIDEO, videos=[clip], num_frames=args.frames
        ),
    }
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {os.getloadavg()}")
    for name, request in cases.items():
        times = timed(proc, request, args.repeats)
        (serial, parallel) = (statistics.median(t) for t in times.values())
        mins = " / ".join(f"{min(t):.0f}" for t in times.values())
        print(f"{name}: one by one {serial:.0f} ms, side by side {parallel:.0f} ms (median, "
              f"{serial / parallel:.2f}x; min {mins} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
