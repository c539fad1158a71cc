"""Host time of a repeated large image or long video (issue 15's "again" rows), on the CPU.

`polymodal bench --workload media` sends each input a second time: the processed-input,
encoder and prefix caches should all hit, so the GPU only prefills the text after the media
and samples one token; what is left is host work. This script measures that host work with a
tiny random Qwen2.5-VL (its tower and decoder cost next to nothing, so wall time ~= host
time) and the 7B's processor settings (a 1080p image is 2.7k slots, 64 frames of 1280x720 are
38k): a 1920x1080 PIL image and a 64-frame 1280x720 frame list (as `bench/media.py` makes
them) are each sent once, then again, as the bench sends them (`process_tokens`, `stage`,
`add_request`, steps to the first token). Prints the repeat's time by stage (median over
`--repeats`) and the cProfile of one repeat with `--profile`:

    python scripts/bench_repeat_media.py [--repeats 5] [--frames 64] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from polymodal.bench.media import media
from polymodal.demo_model import write_demo_checkpoint
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.chat import MediaRef
from polymodal.processors.qwen_config import load_qwen_vl_config
from polymodal.processors.qwen_vl import QwenVLProcessor

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("process", "stage", "add_request", "steps", "total")


def write_checkpoint(out: Path) -> Path:
    """A tiny random Qwen2.5-VL with 128k positions and the 7B's processor config."""
    path = write_demo_checkpoint(out, "qwen2_5_vl")
    config = json.loads((path / "config.json").read_text())
    for section in (config, config.get("text_config", {})):
        section["max_position_embeddings"] = 131072
    (path / "config.json").write_text(json.dumps(config))
    for name in ("processor_config.json", "video_preprocessor_config.json"):
        (path / name).unlink(missing_ok=True)
    shutil.copy(ROOT / "sdk/configs/qwen2_5_vl_7b/preprocessor_config.json", path)
    return path


def request(engine: Engine, processor: QwenVLProcessor, kind: str, item, seed: int) -> dict:
    """One request as `bench/media.py` sends it; milliseconds per stage and the first token."""
    cfg, times = processor.config, {}
    token = cfg.image_token_id if kind == "image" else cfg.video_token_id
    ids = [cfg.vision_start_token_id, token, cfg.vision_start_token_id + 1]
    ids += [(seed * 7919 + i * 31) % 400 + 10 for i in range(32)]  # 32 text tokens
    start = last = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times[stage], last = (now - last) * 1e3, now

    prompt = processor.process_tokens(ids, [MediaRef(kind, item)])
    lap("process")
    engine.runner.model.stage_ahead(prompt.mm_items)
    lap("stage")
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    request_id = engine.add_request(
        prompt.token_ids, params, None, prompt.positions, prompt.mrope_delta, prompt.mm_items
    )
    lap("add_request")
    token = None
    while token is None:
        for out in engine.step():
            if out.request_id == request_id:
                token = out.outputs[0].token_ids[0]
    lap("steps")
    times["total"] = (time.perf_counter() - start) * 1e3
    while engine.has_unfinished():
        engine.step()
    return {"ms": times, "token": token, "prompt_tokens": len(prompt.token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="cProfile one repeat of each")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp) / "qwen2_5_vl")
        config = EngineConfig(
            device="cpu", dtype="float32", max_model_len=65536, num_kv_blocks=8192,
            max_num_batched_tokens=16384, skip_tokenizer_init=True,
            enable_prefix_caching=True, encoder_cache_mb=1024,
        )  # fmt: skip
        engine = Engine(str(ckpt), config)
        processor = QwenVLProcessor(None, load_qwen_vl_config(ckpt))
    from polymodal.bench import media as bench_media

    bench_media.VIDEOS["video_n"] = args.frames
    results = {}
    for name in ("1080p", "video_n"):
        kind, item = media(name, seed=11)
        first = request(engine, processor, kind, item, seed=11)
        again = [request(engine, processor, kind, item, seed=11) for _ in range(args.repeats)]
        tokens = {first["token"], *(r["token"] for r in again)}
        row = {s: statistics.median(r["ms"][s] for r in again) for s in STAGES}
        label = "1080p" if kind == "image" else f"{args.frames} frames"
        results[label] = {
            "first_ms": first["ms"]["total"], "again_ms": row,
            "prompt_tokens": first["prompt_tokens"], "same_token": len(tokens) == 1,
        }  # fmt: skip
        cells = "  ".join(f"{s} {row[s]:7.1f}" for s in STAGES)
        print(f"{label:10s} tokens {first['prompt_tokens']:6d}  first {first['ms']['total']:8.1f}"
              f" ms | again: {cells} ms | same token: {len(tokens) == 1}", flush=True)  # fmt: skip
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(request, engine, processor, kind, item, 11)
            pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
