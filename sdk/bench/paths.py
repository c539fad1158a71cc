"""`polymodal bench --workload paths`: what users run, next to the engine's own numbers.

In one run, on one checkpoint (a shipped config gets a tokenizer with the real vocabulary and
special-token ids, and random weights):
Each side runs in its own process, one after the other.
  bench    the engine workloads (token-id prompts, in-memory images): decode ms/token (median
           gap and wall (N+1 - 1)/N), TTFT of a 448x448 image, captioning images/s
  pipeline `Pipeline(dir)` with default settings: the same decode by wall time, TTFT of fresh
           448x448 JPEG files (first call of the process, tenth, median), load seconds
  caption  `polymodal caption DIR` as a subprocess over JPEG files (its own first-to-last
           rate), then again with nothing left to do (wall seconds of the whole process)
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

TTFT_TEXT = "Describe this image in one short sentence, please."


def write_jpegs(folder: Path, n: int, size: int = 448, seed: int = 0) -> list[Path]:
    """n distinct photo-like JPEGs (smooth colour fields with grain, quality 90)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
        pixels = np.asarray(base.resize((size, size), Image.BICUBIC), dtype=np.int16)
        pixels += rng.integers(-8, 9, pixels.shape, dtype=np.int16)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def user_checkpoint(model_dir: Path, work: Path) -> tuple[Path, bool]:
    """(a checkpoint dir users' code can load, whether it runs with dummy weights)."""
    from polymodal.bench.checkpoint import has_tokenizer, write_user_checkpoint

    has_weights = any(model_dir.glob("*.safetensors"))
    if has_tokenizer(model_dir):
        return model_dir, not has_weights
    return write_user_checkpoint(model_dir, work / "checkpoint"), True


def engine_side(model_dir: Path, args) -> dict:
    """The engine bench's decode, TTFT and captioning numbers, measured here."""
    from polymodal.bench.workloads import OurSide, images

    ours = OurSide(model_dir, dummy_weights=True)
    ours.caption(images(64, seed=77), 8)  # warm-up, as the engine workload does
    ours.ttft_ms(None, repeats=2)
    out = {
        "decode_ms_per_token": ours.decode_ms(args.decode_tokens),
        "decode_wall_ms_per_token": ours.decode_wall_ms(args.decode_tokens),
        "ttft_ms": ours.ttft_ms(None),
        **ours.caption(images(args.images), args.output_tokens),
    }
    ours.free()
    return out


def pipeline_side(ckpt: Path, dummy: bool, jpegs: list[Path], args) -> dict:
    """`Pipeline` with default settings: load time, decode by wall time, TTFT on JPEG files."""
    import torch

    from polymodal.pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline(str(ckpt), dummy_weights=dummy)
    load_s = time.perf_counter() - start

    def wall(**request) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(**request)
        return time.perf_counter() - t0

    # greedy, as the engine workload's TTFT (the default temperature would add the sampler)
    calls = [wall(image=str(p), text=TTFT_TEXT, max_tokens=1, temperature=0.0) for p in jpegs]
    n = args.decode_tokens
    text = dict(text=TTFT_TEXT, temperature=0.0, ignore_eos=True)
    diffs = [wall(**text, max_tokens=n + 1) - wall(**text, max_tokens=1) for _ in range(3)]
    return {
        "load_s": load_s,
        "decode_wall_ms_per_token": statistics.median(diffs) / n * 1e3,
        "ttft_first_ms": calls[0] * 1e3,
        "ttft_tenth_ms": calls[min(9, len(calls) - 1)] * 1e3,
        "ttft_ms": statistics.median(calls[1:]) * 1e3,
        "ttft_calls_ms": [round(c * 1e3, 2) for c in calls],
    }


def caption_side(ckpt: Path, dummy: bool, folder: Path, work: Path, args) -> dict:
    """`polymodal caption` as a user runs it, then its rerun with every item done."""
    out = work / "captions.jsonl"
    cmd = [sys.executable, "-m", "polymodal.cli", "caption", str(folder), "--model", str(ckpt)]
    cmd += ["--out", str(out), "--max-tokens", str(args.output_tokens), "--ignore-eos"]
    cmd += ["--no-progress"] + (["--load-format", "dummy"] if dummy else [])
    results = {}
    for name in ("caption", "rerun"):
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode != 0:
            raise RuntimeError(f"polymodal caption failed:\n{run.stderr[-3000:]}")
        rate = re.search(r"([\d.]+) items/s", run.stderr)
        results[f"{name}_process_s"] = wall
        if name == "caption":
            results["images_s"] = float(rate.group(1)) if rate else None
    return results


def in_child(fn, *args):
    """`fn(*args)` in a fresh process, so that each side has the GPU to itself and hands
    every byte back when it ends."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def run_bench(args) -> dict:
    """Every measurement of the paths workload, in one process (see the module docstring)."""
    import torch

    from polymodal.bench import resolve_bench_model

    if not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device")
    model_dir = resolve_bench_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="polymodal-bench-"))
    ckpt, dummy = user_checkpoint(model_dir, work)
    dummy = dummy or args.dummy_weights
    results = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model),
        "workload": "paths",
    }
    results["bench"] = in_child(engine_side, model_dir, args)
    ttft_jpegs = write_jpegs(work / "ttft", args.ttft_calls, seed=5)
    results["pipeline"] = in_child(pipeline_side, ckpt, dummy, ttft_jpegs, args)
    folder = work / "caption"
    write_jpegs(folder, args.caption_files, seed=6)
    results["caption"] = caption_side(ckpt, dummy, folder, work, args)
    return results


def print_table(r: dict) -> None:
    """Each user path next to the engine's number from the same run."""
    b, p, c = r["bench"], r["pipeline"], r["caption"]
    print(f"\n{r['card']}  {r['date']}  {r['model']}  (paths)")
    rows = [
        ("decode ms/token (median gap)", b["decode_ms_per_token"], None),
        ("decode ms/token (wall)", b["decode_wall_ms_per_token"], p["decode_wall_ms_per_token"]),
        ("TTFT ms (448 px)", b["ttft_ms"], p["ttft_ms"]),
        ("TTFT ms, first call of the process", None, p["ttft_first_ms"]),
        ("TTFT ms, tenth call", None, p["ttft_tenth_ms"]),
        ("captioning images/s", b["images_s"], c["images_s"]),
        ("caption rerun, nothing to do (s)", None, c["rerun_process_s"]),
        ("Pipeline load (s)", None, p["load_s"]),
    ]  # fmt: skip
    print(f"{'metric':36s} {'engine':>9s} {'user path':>10s}")
    for label, ours, user in rows:
        cells = [f"{v:.2f}" if v is not None else "-" for v in (ours, user)]
        print(f"{label:36s} {cells[0]:>9s} {cells[1]:>10s}")
