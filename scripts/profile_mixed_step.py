"""Host time of the captioning workload's steps on the CPU (issue 15's idle gaps): a tiny random
Qwen2.5-VL, decode rows of `--decodes` requests, then one 1080p image prompt whose prefill
(2725 tokens, as the 7B's) lands in a step mixed with those decode rows. cProfile of that
step and of a plain decode step; host work of the mixed step that scales with the prompt shows
at the top (the tiny model's forward is cheap, so the host's share is large here).

    python scripts/profile_mixed_step.py                       # torch backend (fast on CPU)
    TRITON_INTERPRET=1 python scripts/profile_mixed_step.py --backend triton   # slow
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time

from polymodal.bench.media import IMAGES, photo
from polymodal.bench.workloads import TEXT_TOKENS, text_ids
from polymodal.demo_model import write_demo_checkpoint
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.chat import MediaRef
from polymodal.processors.qwen_vl import QwenVLProcessor, load_qwen_vl_config


def profiled(fn, top: int) -> tuple[float, str]:
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(top)
    return wall, text.getvalue()


def _as_the_7b(path, length: int) -> None:
    """Longer positions than the tiny text config's 2048, and Qwen2.5-VL's own pixel limit
    (the tiny processor caps images at 200k pixels): a 1080p image is 2691 slots again."""
    config = json.loads((path / "config.json").read_text())
    for cfg in (config, config.get("text_config") or {}):
        if "max_position_embeddings" in cfg:
            cfg["max_position_embeddings"] = length
    (path / "config.json").write_text(json.dumps(config))
    processor = json.loads((path / "processor_config.json").read_text())
    processor["image_processor"]["size"]["longest_edge"] = 12845056
    (path / "processor_config.json").write_text(json.dumps(processor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decodes", type=int, default=8)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    path = write_demo_checkpoint(tempfile.mkdtemp(), "qwen2_5_vl")
    _as_the_7b(path, 8192)
    config = EngineConfig(dtype="float32", device="cpu", attention_backend=args.backend,
                          skip_tokenizer_init=True, max_model_len=4096, num_kv_blocks=1024,
                          max_num_batched_tokens=16384, enable_prefix_caching=False)  # fmt: skip
    engine = Engine(str(path), config)
    processor = QwenVLProcessor(None, load_qwen_vl_config(path))
    cfg, vocab = processor.config, engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i in range(args.decodes):
        engine.add_request(text_ids(TEXT_TOKENS, i, vocab), params)
    for _ in range(3):  # prefills done, decode rows running
        engine.step()
    _, decode_text = profiled(engine.step, args.top)
    decode_wall = min(profiled(engine.step, 0)[0] for _ in range(3))
    ids = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_start_token_id + 1]
    ids += text_ids(TEXT_TOKENS, 99, vocab)
    prompt = processor.process_tokens(ids, [MediaRef("image", photo(IMAGES["1080p"], 5))])
    engine.add_request(prompt.token_ids, params, None, prompt.positions, prompt.mrope_delta,
                       prompt.mm_items)  # fmt: skip
    mixed_wall, mixed_text = profiled(engine.step, args.top)
    print(f"prompt {len(prompt.token_ids)} tokens + {args.decodes} decode rows")
    print(f"mixed step: {mixed_wall * 1e3:.1f} ms host+CPU compute; decode step: "
          f"{decode_wall * 1e3:.1f} ms\n")  # fmt: skip
    print("== mixed step (cumulative) ==\n" + mixed_text)
    print("== decode step (cumulative) ==\n" + decode_text)


if __name__ == "__main__":
    main()
