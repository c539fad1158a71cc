"""`polymodal bench --workload media`: TTFT of large images and long videos against
transformers and against the compute floor, in one run (issue 15).

Inputs (photo-like, distinct per call): 448x448, 1920x1080 and 3840x2160 images; 16, 64 and
256 frames of 1280x720 given as frame lists, each with 32 text tokens. For each: our TTFT from
raw media to the first token, processing included: the first input of its size ("first"),
then the median of fresh inputs of that size once the engine has seen the size twice (the
tower captures a CUDA graph per layout and a new SDPA shape gets its cuDNN plan on the second
sight, so a stream of same-size media replays them; long videos: the third of three) and
its host share ("host": processing and staging, before the engine sees the request); the
same input again (the encoder and prefix caches hit; the median of `REPEATS` calls, the first
of which was 0.5-1.5 ms above the rest on an H100); transformers'
`generate(max_new_tokens=1)` on the same weights. The floor is the input's FLOPs (decoder
GEMMs and causal attention, vision tower GEMMs, full- and window-attention) over the bf16
matrix rate measured in the same run. An input our engine refuses (over `max_model_len`) is
reported with its error, never a crash. Then captioning 1080p images against the floor's
rate (`bench/media_caption.py`; `--images`, default 64, `--output-tokens`). `--profile` adds
the kernel table of one more fresh 1080p, 4K and 64-frame TTFT each, and of a 1080p repeat.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from PIL import Image

from polymodal.bench.workloads import TEXT_TOKENS, OurSide, _max_positions, text_ids
from polymodal.processors.chat import MediaRef

IMAGES = {"448px": (448, 448), "1080p": (1920, 1080), "4k": (3840, 2160)}
VIDEOS = {"video16": 16, "video64": 64, "video256": 256}
VIDEO_SIZE = (1280, 720)
PROFILED = ("1080p", "4k", "video64")  # `--profile`: a kernel table of one fresh TTFT each
MAX_MODEL_LEN = 131072  # the engine's own limit for the long videos (Qwen2.5-VL: 128k)
REPEATS = 5  # calls of the same input again ("again ms": their median)


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random colour field with grain, `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    pixels = np.asarray(base.resize(size, Image.BICUBIC), dtype=np.int16)
    pixels += rng.integers(-6, 7, pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def media(name: str, seed: int):
    """(kind, media) for an input name: a PIL image or a list of video frames."""
    if name in IMAGES:
        return "image", photo(IMAGES[name], seed)
    first = photo(VIDEO_SIZE, seed)
    frames = [first.transform(VIDEO_SIZE, Image.AFFINE, (1, 0, i, 0, 1, 0)) for i in range(
        VIDEOS[name])]  # fmt: skip
    return "video", frames


def matmul_tflops() -> float:
    """bf16 8192^3 matrix product rate on this card (random data), TFLOP/s."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def input_flops(model, grid_thw: torch.Tensor, num_tokens: int) -> float:
    """FLOPs of a prefill over `num_tokens` holding one media item of `grid_thw` patches:
    2 per weight per token (decoder) or patch (tower), plus attention's two products."""
    tower = model.visual
    patches = int(grid_thw.prod())
    t, h, w = (int(v) for v in grid_thw.reshape(-1))
    tower_params = sum(p.numel() for p in tower.parameters())
    vcfg = model.config.hf_config.vision_config
    width, depth = vcfg.hidden_size, vcfg.depth
    full = len(getattr(vcfg, "fullatt_block_indexes", None) or range(depth))
    window = (getattr(vcfg, "window_size", 0) // vcfg.patch_size) ** 2 or h * w
    per_slice = h * w  # attention segments are the frames of one temporal patch
    tower_attn = 4 * width * (full * t * per_slice**2 + (depth - full) * patches * window)
    layers = model.model.layers
    decoder_params = sum(p.numel() for p in layers.parameters())
    cfg = model.config
    attn = 2 * len(layers) * cfg.num_heads * cfg.head_dim * num_tokens**2  # causal: half of 4
    return 2 * tower_params * patches + tower_attn + 2 * decoder_params * num_tokens + attn


def ours_ttft(ours: OurSide, name: str, seeds: list[int], again: bool) -> dict:
    """Median TTFT (ms) over fresh inputs; with `again`, also the last input repeated
    `REPEATS` times (median)."""
    cfg = ours.processor.config
    times, host, last, tokens, grid = [], [], None, 0, None
    for seed in seeds:
        kind, item = media(name, seed)
        token = cfg.image_token_id if kind == "image" else cfg.video_token_id
        ids = [cfg.vision_start_token_id, token, cfg.vision_start_token_id + 1]
        ids += text_ids(TEXT_TOKENS, seed, ours.vocab)
        last = (ids, kind, item)
        times.append(_first_token_ms(ours, ids, kind, item, host))
        prompt = ours.processor.process_tokens(ids, [MediaRef(kind, item)])
        tokens, grid = len(prompt.token_ids), prompt.mm_items[0].data["grid_thw"]
    steady = times[2:] or times  # after the size's eager sight and the graph capture
    out = {"ttft_ms": statistics.median(steady), "first_ttft_ms": times[0],
           "host_ms": statistics.median(host[2:] or host), "calls_ms": times,
           "prompt_tokens": tokens, "grid_thw": grid}  # fmt: skip
    if again:  # the median of REPEATS calls ("again"), each call in "repeat_calls_ms"
        calls = [_first_token_ms(ours, *last) for _ in range(REPEATS)]
        out["repeat_ttft_ms"], out["repeat_calls_ms"] = statistics.median(calls), calls
    return out


def warm_up(ours: OurSide) -> None:
    """What `LLM`'s load-time warm-up runs before a user's first request (`llm_warmup.py`): two
    448 px images (compiles, the tower graph's capture), one of an odd size (the GPU resize
    kernels) and a 4-frame 224 px video (the video layout's kernels)."""
    ours_ttft(ours, "448px", [900, 901], again=False)
    cfg = ours.processor.config
    text = text_ids(TEXT_TOKENS, 902, ours.vocab)
    for kind, token, item in (
        ("image", cfg.image_token_id, photo((500, 333), 902)),
        ("video", cfg.video_token_id, [photo((224, 224), 903 + i) for i in range(4)]),
    ):
        ids = [cfg.vision_start_token_id, token, cfg.vision_start_token_id + 1] + text
        _first_token_ms(ours, ids, kind, item)


def _first_token_ms(ours: OurSide, ids, kind, item, host: list | None = None) -> float:
    """Raw media -> first token, ms; `host` gets the host's share before the engine sees the
    request (processing, and staging's queueing of the upload and the resize)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    prompt = ours.processor.process_tokens(ids, [MediaRef(kind, item)])
    ours.model.stage_ahead(prompt.mm_items)
    if host is not None:
        host.append((time.perf_counter() - start) * 1e3)
    request_id = ours._add(prompt, 1)
    while not any(o.request_id == request_id for o in ours.engine.step()):
        pass
    elapsed = (time.perf_counter() - start) * 1e3
    ours.engine.step()  # resolve a step left in flight
    return elapsed


def ttft_profile(ours: OurSide, name: str, again: bool = False) -> dict:
    """Kernel table of one fresh input's TTFT (`--profile`; `again`: the same input's second
    TTFT, its encoder output and prefix cached): GPU busy time, each step phase's and
    attention route's GPU span, the kernels by exclusive time, the idle gaps and what the
    engine thread ran in the largest."""
    from polymodal.bench.profile import calls_profile, engine_ranges, print_calls_profile
    from polymodal.bench.trace import print_gap_hosts

    cfg = ours.processor.config
    kind, item = media(name, 31)
    token = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = [cfg.vision_start_token_id, token, cfg.vision_start_token_id + 1]
    ids += text_ids(TEXT_TOKENS, 31, ours.vocab)
    if again:
        _first_token_ms(ours, ids, kind, item)
    ranges = engine_ranges(ours.engine)
    out = calls_profile(lambda: _first_token_ms(ours, ids, kind, item), 1, ranges, top=24,
                        host_pairs=4 if again else 0)  # fmt: skip
    which = "the same input again" if again else "a fresh input"
    print_calls_profile(f"{name} TTFT, {which}", out)
    if out.get("gap_hosts"):
        print("  idle gaps and what the engine thread ran meanwhile:")
        print_gap_hosts(out["gap_hosts"])
    return out


def hf_ttft(hf, name: str, seeds: list[int]) -> float:
    """transformers: processor + `generate(max_new_tokens=1)`, median over fresh inputs."""
    times = []
    for seed in seeds:
        kind, item = media(name, seed)
        torch.cuda.synchronize()
        start = time.perf_counter()
        hf._generate(hf.media_inputs(kind, item, seed), 1)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_bench(args) -> dict:
    from polymodal.bench import resolve_bench_model
    from polymodal.bench.hf import HFSide

    if not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device")
    model_dir = resolve_bench_model(args.model)
    rate = matmul_tflops()
    results = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "model": str(args.model), "workload": "media", "matmul_tflops": rate}  # fmt: skip
    hf = None if args.skip_hf else HFSide(model_dir)
    if hf is not None:
        hf.model.to("cpu")  # each side has the GPU to itself
        torch.cuda.empty_cache()
    max_len = min(MAX_MODEL_LEN, _max_positions(model_dir))
    ours = OurSide(model_dir, dummy_weights=True, weights_from=hf and hf.model,
                   max_model_len=max_len, prefix_caching=True)  # fmt: skip
    warm_up(ours)
    rows = {}
    for name in [*IMAGES, *VIDEOS]:
        # long videos: the first and two fresh ones (TTFT: the third; the second sees the
        # size's cuDNN plans built and its pieces' tower graphs captured)
        seeds = (
            [11, 12, 13, 14, 15] if name in IMAGES or VIDEOS.get(name, 0) <= 16 else [11, 12, 13]
        )
        try:
            row = ours_ttft(ours, name, seeds, again=True)
        except Exception as exc:  # noqa: BLE001 - reported: the engine must survive it
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        flops = input_flops(ours.model, row.pop("grid_thw"), row["prompt_tokens"])
        row["floor_ms"] = flops / (rate * 1e12) * 1e3
        row["fraction_of_floor"] = row["floor_ms"] / row["ttft_ms"]
        rows[name] = row
        print(f"{name}: {row}", flush=True)  # a run cut short still shows what it measured
    if getattr(args, "profile", False):
        results["profiles"] = {n: ttft_profile(ours, n) for n in PROFILED if n in rows}
        results["profiles"]["1080p again"] = ttft_profile(ours, "1080p", again=True)
    from polymodal.bench.media_caption import caption_1080p

    results["caption_1080p"] = caption_1080p(ours, args.images or 64, args.output_tokens, rate)
    ours.free()
    if hf is not None:
        hf.model.to("cuda")
        for name, row in rows.items():
            if "error" not in row and VIDEOS.get(name, 0) <= 64:
                row["hf_ttft_ms"] = hf_ttft(hf, name, [21, 22] if name in IMAGES else [21])
                row["speedup"] = row["hf_ttft_ms"] / row["ttft_ms"]
    results["inputs"] = rows
    return results


def print_table(r: dict) -> None:
    print(f"\n{r['card']}  {r['date']}  {r['model']}  (media; bf16 GEMM "
          f"{r['matmul_tflops']:.0f} TFLOP/s)")  # fmt: skip
    head = ("input", "tokens", "first ms", "TTFT ms", "host ms", "again ms", "floor ms",
            "% floor", "HF ms", "x HF")  # fmt: skip
    print("{:10s} {:>7s} {:>9s} {:>9s} {:>8s} {:>9s} {:>9s} {:>8s} {:>9s} {:>6s}".format(*head))
    for name, row in r["inputs"].items():
        if "error" in row:
            print(f"{name:10s} refused: {row['error'][:90]}")
            continue
        cells = [
            ("{:7d}", row["prompt_tokens"]),
            ("{:9.1f}", row["first_ttft_ms"]),
            ("{:9.1f}", row["ttft_ms"]),
            ("{:8.1f}", row.get("host_ms")),
            ("{:9.1f}", row["repeat_ttft_ms"]),
            ("{:9.1f}", row["floor_ms"]),
            ("{:7.0f}%", 100 * row["fraction_of_floor"]),
            ("{:9.1f}", row.get("hf_ttft_ms")),
            ("{:6.1f}", row.get("speedup")),
        ]
        text = [f.format(v) if v is not None else "-".rjust(len(f.format(0))) for f, v in cells]
        print(f"{name:10s} " + " ".join(text))
    if "caption_1080p" in r:
        from polymodal.bench.media_caption import print_row

        print_row(r["caption_1080p"])
