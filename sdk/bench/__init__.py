"""`polymodal bench`: what the engine and the user paths deliver on a GPU, each next to its
reference measured in the same run.

Workloads (`--workload`):
  engine  the engine alone vs transformers on the same weights: batch-1 decode against the HBM
          floor, TTFT of one 448x448 image, offline captioning (`bench/engine.py`)
  paths   what users run vs the engine's own numbers: `Pipeline` decode and TTFT on JPEG
          files, `polymodal caption` over JPEG files, its nothing-to-do rerun (`bench/paths.py`)
  serve   the real `polymodal serve` process under N concurrent streamed image requests vs
          the offline rate of the same requests (`bench/serve.py`)
  media   TTFT of 448 px / 1080p / 4K images and 16 / 64 / 256-frame 720p videos (and of
          each again) vs transformers and the compute floor (`bench/media.py`), and
          captioning 1080p images vs the floor's rate (`bench/media_caption.py`)
A built-in name (`qwen2.5-vl-7b`) is a shipped config run with random weights; a checkpoint
directory runs as it is (`--dummy-weights` skips its safetensors).

Other families' models run their own bench in place of the engine workload (`FAMILY_BENCHES`,
by config.json's model_type): the placeholder-expanding VL families (Gemma 3, LLaVA-NeXT,
LLaVA-OneVision, Pixtral / Mistral 3, Llama 4, Mllama: TTFT, decode and captioning against their
floors, `bench/vl.py`), Whisper transcription (`bench/whisper.py`), Phi-4-multimodal audio /
image / mixed requests (`bench/phi4mm.py`), NVILA captioning and a 64-frame video's TTFT
(`bench/vila.py`, next to the reference composed from transformers' blocks: transformers has
no VILA), each through the user path next to transformers on the same weights; a text-only
decoder (`*ForCausalLM`: Gemma 3 text, Qwen3-MoE, Mixtral, DeepSeek-V3, Llama-like) its
batch-1 decode against the floor and its throughput against transformers' (`bench/text.py`).
A family bench module may set `DEFAULTS` for the shared count options (`--images`, `--hf-images`,
`--hf-batch`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIGS = Path(__file__).parent.parent / "configs"
BUILTIN = {
    "qwen2.5-vl-7b": CONFIGS / "qwen2_5_vl_7b",
    # the VL families below run `bench/vl.py` (gemma-3-12b-it, llava-next-7b,
    # llava-onevision-7b, pixtral-12b, llama4-scout-reduced); the text-only and MoE configs
    # run `bench/text.py` (the engine workload drives Qwen-VL prompts)
    "gemma-3-12b": CONFIGS / "gemma_3_12b",  # the text decoder alone
    "gemma-3-12b-it": CONFIGS / "gemma_3_12b_it",  # with its SigLIP tower (896 px, 256 tokens)
    "llava-next-7b": CONFIGS / "llava_next_7b",  # llava-v1.6-mistral-7b-hf
    # llava-hf/llava-onevision-qwen2-7b-ov-hf: Qwen2-7B + SigLIP-384, anyres_max_9, video
    "llava-onevision-7b": CONFIGS / "llava_onevision_7b",
    "pixtral-12b": CONFIGS / "pixtral_12b",  # mistral-community/pixtral-12b (LLaVA form)
    # Efficient-Large-Model/NVILA-8B: Qwen2-7B + SigLIP-448, dynamic S2, TSP video (config only)
    "nvila-8b": CONFIGS / "nvila_8b",
    # naver-hyperclovax/HyperCLOVAX-SEED-Vision-Instruct-3B: SigLIP-378 + C-Abstractor + a
    # Llama decoder (config only; sizes from the model card and vLLM, see docs/models.md)
    "hyperclovax-seed-vision-3b": CONFIGS / "hyperclovax_seed_vision_3b",
    # meta-llama/Llama-3.2-11B-Vision(-Instruct): cross-attention to the image tiles
    "llama-3.2-11b-vision": CONFIGS / "llama_3_2_11b_vision",
    # openai/whisper-large-v3 (config, feature extractor and generation config; the tokenizer
    # comes with a download; `bench/checkpoint.py` writes one with its special-token ids)
    "whisper-large-v3": CONFIGS / "whisper_large_v3",
    # microsoft/Phi-4-multimodal-instruct in the hub's own layout (config + processor settings;
    # the tokenizer comes with a download; its vision / speech LoRA are not in the dummy weights)
    "phi-4-multimodal": CONFIGS / "phi_4_multimodal",
    "qwen3-30b-a3b": CONFIGS / "qwen3_30b_a3b",
    "mixtral-8x7b": CONFIGS / "mixtral_8x7b",
    "deepseek-v3-reduced": CONFIGS / "deepseek_v3_reduced",  # 3 of 61 layers: its README
    "llama4-scout-reduced": CONFIGS / "llama4_scout_reduced",  # 8 of 48 layers: its README
}
WORKLOADS = ("engine", "paths", "serve", "media")
# config.json's model_type -> the bench module that replaces the engine workload for it
FAMILY_BENCHES = {
    **dict.fromkeys(
        ("gemma3", "llava", "llava_next", "llava_onevision", "llama4", "mistral3", "mllama"),
        "polymodal.bench.vl",
    ),
    "whisper": "polymodal.bench.whisper",
    "phi4mm": "polymodal.bench.phi4mm",  # the hub's layout
    "phi4_multimodal": "polymodal.bench.phi4mm",  # transformers'
    "llava_llama": "polymodal.bench.vila",  # VILA / NVILA (`LlavaLlamaModel`)
}
# the shared count options' defaults, unless the family bench module sets its own (`DEFAULTS`)
COUNT_DEFAULTS = {"images": 512, "hf_images": 64, "hf_batch": 32}


def resolve_bench_model(model: str) -> Path:
    """A built-in architecture name -> its shipped config dir; anything else as a path."""
    return BUILTIN.get(model, Path(model))


def family_bench(model_dir: Path) -> str | None:
    """The bench module of `model_dir`'s family when it has its own (`FAMILY_BENCHES`; a
    text-only `*ForCausalLM` without a vision config: `bench/text.py`)."""
    config = model_dir / "config.json"
    cfg = json.loads(config.read_text()) if config.is_file() else {}
    if cfg.get("model_type") in FAMILY_BENCHES:
        return FAMILY_BENCHES[cfg["model_type"]]
    text_only = "vision_config" not in cfg and "audio_config" not in cfg
    if text_only and any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or ()):
        return "polymodal.bench.text"
    return None


def bench_command(parser: argparse.ArgumentParser):
    """Add the `bench` arguments; returns `run(args) -> int`."""
    parser.description = "Benchmark the engine and the user paths on a GPU (CUDA)."
    parser.add_argument(
        "model",
        nargs="?",
        default="qwen2.5-vl-7b",
        help="checkpoint dir or a built-in architecture: " + ", ".join(BUILTIN),
    )
    parser.add_argument("--workload", choices=WORKLOADS, default="engine")
    parser.add_argument("--dummy-weights", action="store_true")
    parser.add_argument(
        "--images",
        type=int,
        help="captioning size (default 512; VL families 256, NVILA 128; media: 64 1080p)",
    )
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=256)
    engine = parser.add_argument_group("engine workload")
    engine.add_argument(
        "--hf-images", type=int, help="transformers' subset (default 64; VL 32, NVILA 16)"
    )
    engine.add_argument(
        "--hf-batch", type=int, help="transformers' batch (default 32; VL families, NVILA 8)"
    )
    engine.add_argument(
        "--peak-tflops",
        type=float,
        help="bf16 TFLOP/s of the VL families' TTFT floors (default: the 8192^3 product's rate "
        "measured in the same run, as the media bench's)",
    )
    engine.add_argument("--skip-hf", action="store_true")
    engine.add_argument("--profile", action="store_true", help="add phase and kernel tables")
    engine.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="launch each step before reading the previous one's tokens (the engine default)",
    )
    engine.add_argument(
        "--gemv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Triton GEMV for one-row decoder linears (the engine default)",
    )
    engine.add_argument(
        "--quantization",
        choices=("fp8", "awq", "gptq"),
        help="our side's decoder weights quantized on load (fp8: the random bf16 weights; "
        "awq/gptq: random 4-bit tensors in the format); transformers keeps bf16",
    )
    engine.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto")
    engine.add_argument(
        "--speculative-config",
        type=json.loads,
        help="our side drafts (n-gram, JSON as serve's): decode is then timed per token of "
        "wall time and the acceptance rate reported",
    )
    engine.add_argument(
        "--pdl",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="programmatic dependent launch of the Triton kernels on sm_90+ (the default)",
    )
    speech = parser.add_argument_group("speech families (Whisper, Phi-4-multimodal)")
    speech.add_argument("--clips", type=int, default=256, help="requests of each workload")
    speech.add_argument(
        "--hf-clips", type=int, help="transformers' subset (default: Whisper 64, Phi-4-MM 32)"
    )
    speech.add_argument(
        "--phi-workloads",
        default="audio,image,mixed",
        help="Phi-4-multimodal: audio (a 30 s clip + an instruction), image (448x448 + a "
        "question), mixed (both in one request)",
    )
    speech.add_argument("--device", default="cuda", help="cpu: a tiny checkpoint, as the tests")
    vila = parser.add_argument_group("NVILA")
    vila.add_argument(
        "--video-frames", type=int, default=64, help="frames of the one video request (448x448)"
    )
    paths = parser.add_argument_group("paths and serve workloads")
    paths.add_argument("--caption-files", type=int, default=2048, help="JPEGs `caption` reads")
    paths.add_argument("--ttft-calls", type=int, default=12, help="Pipeline image calls")
    paths.add_argument("--requests", type=int, default=256, help="concurrent server requests")
    paths.add_argument(
        "--bursts", type=int, default=1,
        help="serve: bursts in a row on the one server, each of fresh images (the first is the "
        "headline; later ones show the warm server)",
    )  # fmt: skip
    paths.add_argument("--port", type=int, default=8765)
    paths.add_argument(
        "--server-args", default="",
        help="more `polymodal serve` options for the serve workload, one string "
        "(e.g. '--max-num-batched-tokens 8192')",
    )  # fmt: skip
    parser.add_argument("--json", default="bench.json", help="where to write the results")

    def run(args) -> int:
        import importlib

        family = family_bench(resolve_bench_model(args.model))
        defaults = dict(COUNT_DEFAULTS)
        if family is not None:
            if args.workload != "engine":
                raise SystemExit(f"{args.model}: only its own bench runs ({family}), no --workload")
            module = importlib.import_module(family)
            print_table, run_bench = module.print_table, module.run_bench
            defaults.update(getattr(module, "DEFAULTS", {}))
        elif args.workload == "engine":
            from polymodal.bench.engine import print_table, run_bench
        elif args.workload == "paths":
            from polymodal.bench.paths import print_table, run_bench
        elif args.workload == "media":
            from polymodal.bench.media import print_table, run_bench
        else:
            from polymodal.bench.serve import print_table, run_bench
        for name, value in defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        results = run_bench(args)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print_table(results)
        return 0

    return run
