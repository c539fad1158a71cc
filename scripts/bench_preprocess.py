"""Host time to preprocess one request's media with the Qwen2.5-VL-7B processor settings:
its items one after another vs side by side (`processors/item_pool.py`).

Writes 1080p JPEGs and a 1280x720 H.264 clip (from scikit-image photographs), a checkpoint
folder with the shipped config and a Qwen-id tokenizer, then times `process()` with the
processed-input cache off:

    python scripts/bench_preprocess.py [--images 8] [--videos 2] [--frames 64] [--repeats 5]

`--resize` times instead where one decoded image (448x448, 1080p, 4K, 12 MP photographs) becomes
bf16 pixel values at the 7B's bounds: the CPU route (process, then resize + patchify + normalize
on the host) against the CUDA route (process, then staged: the decoded frame copied, resized,
patchified and normalized on the GPU), and the bicubic resize alone on each:

    python scripts/bench_preprocess.py --resize [--repeats 20]

`--resize --family llava_next` (or `llava_onevision`) times the same for the 7B's LLaVA-NeXT /
OneVision processor settings (a tiny checkpoint's tokenizer; no weights): the host route
(process, then the anyres views' resizes, padding, tiles and normalize on the host) against the
CUDA route (process, then staged: all of that on the GPU), and `process()` alone (decoded
frames kept, the host's share of the CUDA route):

    python scripts/bench_preprocess.py --resize --family llava_next [--repeats 20]
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


def _median_ms(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up: kernels compiled, taps cached, allocator settled
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _resize_row(proc, image: Image.Image, repeats: int) -> str:
    """One table row: the CPU and CUDA routes of `image`, then the resize alone on each."""
    from functools import partial

    from polymodal.llm_core.host_copy import copy_to
    from polymodal.processors.pixels import image_to_frames, resize
    from polymodal.processors.qwen_vision import plan_patches

    frames = image_to_frames(image)
    size = plan_patches(frames, proc.config.image)[0]

    def item():
        return proc.process(prompt=IMAGE, images=[image]).mm_items[0]

    cpu_route = _median_ms(lambda: item().pixel_values(torch.bfloat16), repeats)
    cpu_resize = _median_ms(lambda: resize(frames, size), repeats)
    row = f"{size[0]:>5}x{size[1]:<5} | {cpu_route:9.1f} "
    if not torch.cuda.is_available():
        return row + f"{'(no GPU)':>10} | {cpu_resize:10.1f} {'-':>10}"
    device, sync = torch.device("cuda", torch.cuda.current_device()), torch.cuda.synchronize
    move = partial(copy_to, device=device)
    cuda_route = _median_ms(lambda: item().stage(device, torch.bfloat16, move), repeats, sync)
    gpu_frames = frames.to(device)
    gpu_resize = _median_ms(lambda: resize(gpu_frames, size), repeats, sync)
    return row + f"{cuda_route:10.1f} | {cpu_resize:10.1f} {gpu_resize:10.2f}"


def _llava_row(proc, image: Image.Image, repeats: int) -> str:
    """One table row for a LLaVA-NeXT / OneVision processor: host route, CUDA route, and
    `process()` alone."""
    from functools import partial

    from polymodal.llm_core.host_copy import copy_to

    plan = proc.anyres_plan((image.height, image.width))

    def item():
        return proc.process(prompt="<image>", images=[image]).mm_items[0]

    host_route = _median_ms(lambda: item().pixel_values(torch.bfloat16), repeats)
    process = _median_ms(item, repeats)
    canvas = f"{plan.canvas[0]}x{plan.canvas[1]}"
    row = f"{canvas:>11} {plan.num_views:5} | {host_route:9.1f} "
    if not torch.cuda.is_available():
        return row + f"{'(no GPU)':>10} | {process:10.1f}"
    device, sync = torch.device("cuda", torch.cuda.current_device()), torch.cuda.synchronize
    move = partial(copy_to, device=device)
    cuda_route = _median_ms(lambda: item().stage(device, torch.bfloat16, move), repeats, sync)
    return row + f"{cuda_route:10.1f} | {process:10.1f}"


def llava_processor(family: str, out: Path):
    """The 7B's LLaVA-NeXT / OneVision processor settings on a tiny checkpoint's tokenizer."""
    import shutil

    from polymodal.demo_model import write_demo_checkpoint
    from polymodal.processors.llava import LlavaNextProcessor
    from polymodal.processors.llava_onevision import LlavaOnevisionProcessor

    ckpt = write_demo_checkpoint(out / family, family)
    config = ROOT / "sdk" / "configs" / f"{family}_7b" / "processor_config.json"
    shutil.copy(config, ckpt / "processor_config.json")
    cls = LlavaNextProcessor if family == "llava_next" else LlavaOnevisionProcessor
    return cls.from_pretrained(ckpt, processed_cache_mb=0)


def bench_resize(proc, repeats: int, family: str = "qwen_vl") -> None:
    """CPU vs CUDA route for one decoded image per size (see the module docstring)."""
    import skimage.data

    rng = np.random.default_rng(0)
    sizes = {"448x448": (448, 448), "1080p": (1920, 1080), "4K": (3840, 2160), "12MP": (4000, 3000)}
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {os.getloadavg()}")
    if family == "qwen_vl":
        print(f"{'image':8} {'resized to':>11} | {'CPU route':>9} {'CUDA route':>10} | "
              f"{'CPU resize':>10} {'GPU resize':>10}  (ms, median of {repeats})")  # fmt: skip
    else:
        print(f"{family}: {'image':8} {'canvas':>11} {'views':>5} | {'CPU route':>9} "
              f"{'CUDA route':>10} | {'process()':>10}  (ms, median of {repeats})")  # fmt: skip
    row_of = _resize_row if family == "qwen_vl" else _llava_row
    for name, (width, height) in sizes.items():
        photo = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
        noisy = np.asarray(photo).astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
        image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        print(f"{name:8} {row_of(proc, image, repeats)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resize", action="store_true", help="CPU vs CUDA route per image size")
    parser.add_argument(
        "--family", choices=["qwen_vl", "llava_next", "llava_onevision"], default="qwen_vl"
    )
    args = parser.parse_args()
    from polymodal.bench.checkpoint import write_user_checkpoint

    out = Path(tempfile.mkdtemp())
    if args.family != "qwen_vl":
        if not args.resize:
            parser.error("--family llava_next / llava_onevision times the --resize table only")
        return bench_resize(llava_processor(args.family, out), args.repeats, args.family)
    ckpt = write_user_checkpoint(ROOT / "sdk" / "configs" / "qwen2_5_vl_7b", out / "ckpt")
    proc = qwen_vl.QwenVLProcessor.from_pretrained(ckpt, processed_cache_mb=0)
    if args.resize:  # in-memory images: no files, no video encoder (PyAV) needed
        return bench_resize(proc, args.repeats)
    images, clip = write_media(out, args.images)
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
