"""`polymodal bench` for the image-text families (Llama 4, Gemma 3, LLaVA-NeXT, LLaVA-OneVision,
Pixtral / Mistral 3, whose processors expand text placeholders, and Mllama, whose decoder reads
the image through cross-attention; picked by config.json's model_type, `FAMILY_BENCHES`): ours
next to transformers in the same run, on the same random bf16 tensors.

    polymodal bench llama4-scout-reduced [--images 256] [--output-tokens 128]
    polymodal bench gemma-3-12b-it --hf-images 32 --hf-batch 8 [--profile]
    polymodal bench llama-3.2-11b-vision
    polymodal bench DIR --device cpu --images 4     # a tiny checkpoint, as the test

Workloads, each side alone on the device (transformers' model waits on the host meanwhile):
TTFT of one fresh 448x448 image + a short question (processing included, median of 5),
batch-1 decode of a text prompt, captioning N distinct 448x448 images with M forced tokens
(ours: `LLM.generate` over chat prompts, processing on its worker threads; transformers:
processor + `generate` in batches). Floors: batch-1 decode = the bytes a step reads (only the
chosen experts) / the HBM copy bandwidth; TTFT = max(weights read, FLOPs / the bf16 matrix
rate) of the tower over its tiles, plus the same of the decoder over the prompt (2 x parameters
touched per token; the decoder's attention FLOPs are below 2% at these lengths and left out;
Mllama's cross-attention K / V projections of the image rows, done once a request, are left out
too, so its floor is low: ~0.86 TFLOP for 4 tiles at 11B):
the decoder cannot start before the tower's last layer, so a phase's floor does not hide the
other's. The rate is the 8192^3 product's measured in the same run, as the media bench's floor
(`--peak-tflops` sets one instead); the table also gives the ratio to the datasheet's dense
peak. `--profile` adds the kernels of one image's TTFT.

A built-in name is a shipped config without a tokenizer: one is written with the family's
special tokens at the ids its config names (ordinary ids filled with unused tokens), so both
processors expand images into the same token ids.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from polymodal.bench import resolve_bench_model
from polymodal.bench.checkpoint import build_tokenizer_at, copy_configs
from polymodal.bench.workloads import active_decoder_bytes, images

QUESTION = "Describe this image in detail."
DATASHEET_TFLOPS = 989.0  # dense bf16 of an H100 / H200 SXM: the table's second TTFT ratio
# the family's own defaults for the shared count options (`polymodal bench` applies them)
DEFAULTS = {"images": 256, "hf_images": 32, "hf_batch": 8}
# family (config model_type) -> (module and names of its tiny tokens / template, config
# attribute -> special token placed at that id)
FAMILIES = {
    "llama4": (
        "llama4_vl:LLAMA4_TOKENS:LLAMA4_TEMPLATE",
        {
            "image_token_index": "<|patch|>",
            "boi_token_index": "<|image_start|>",
            "eoi_token_index": "<|image_end|>",
        },
    ),
    "gemma3": (
        "gemma3_vl:GEMMA_TOKENS:GEMMA_TEMPLATE",
        {
            "image_token_index": "<image_soft_token>",
            "boi_token_index": "<start_of_image>",
            "eoi_token_index": "<end_of_image>",
        },
    ),
    "llava_next": ("llava_tiny:None:LLAVA_TEMPLATE", {"image_token_index": "<image>"}),
    "llava_onevision": (
        "llava_tiny:ONEVISION_TOKENS:ONEVISION_TEMPLATE",
        {"image_token_index": "<image>", "video_token_index": "<video>"},
    ),
    "mllama": ("mllama:MLLAMA_TOKENS:MLLAMA_TEMPLATE", {"image_token_index": "<|image|>"}),
    # the shipped `llava` config is Pixtral-12B's LLaVA form: Mistral's tokens
    "llava": ("llava_tiny:MISTRAL_TOKENS:MISTRAL_TEMPLATE", {"image_token_index": "[IMG]"}),
}


def family_tokens(config: dict):
    """(special tokens by role, chat template, {token: id from the config}) of a family."""
    import importlib

    spec, placed = FAMILIES[config["model_type"]]
    module, tokens, template = spec.split(":")
    module = importlib.import_module("polymodal.llm_core.models." + module)
    roles = dict(getattr(module, tokens)) if tokens != "None" else {"image_token": "<image>"}
    ids = {token: config[attr] for attr, token in placed.items() if attr in config}
    return roles, getattr(module, template), ids


def user_checkpoint(model_dir: Path) -> Path:
    """`model_dir` as is when it has a tokenizer, else a copy of its configs with one."""
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    out = Path(tempfile.mkdtemp(prefix="bench_vl_"))
    copy_configs(model_dir, out)
    config = json.loads((model_dir / "config.json").read_text())
    roles, template, ids = family_tokens(config)
    vocab = (config.get("text_config") or config)["vocab_size"]
    build_tokenizer_at(vocab, roles, template, ids).save_pretrained(out)
    return out


def chat(image=None, text: str = QUESTION) -> list[dict]:
    parts = ([{"type": "image", "image": image}] if image is not None else []) + [
        {"type": "text", "text": text}
    ]
    return [{"role": "user", "content": parts}]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class HFRunner:
    """transformers' model (random weights) and processor for `model_dir`."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype):
        import transformers as tf

        config = tf.AutoConfig.from_pretrained(model_dir)
        torch.manual_seed(0)
        with torch.device(device):
            self.model = tf.AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()
        for param in self.model.parameters():  # small weights: finite at any depth
            if param.dim() >= 2:
                param.data.normal_(0.0, 0.02)
        self.processor = tf.AutoProcessor.from_pretrained(model_dir)
        self.device, self.dtype = device, dtype
        text = config.get_text_config()
        self.model.generation_config.pad_token_id = self.processor.tokenizer.pad_token_id
        self.model.generation_config.eos_token_id = None
        self.vocab = text.vocab_size

    def inputs(self, batch: list) -> dict:
        texts = [
            self.processor.apply_chat_template(chat(im), tokenize=False, add_generation_prompt=True)
            for im in batch
        ]
        # one list of images per prompt (Gemma 3's processor counts a flat list as one prompt's)
        pics = [[im] for im in batch if im is not None] or None
        self.processor.tokenizer.padding_side = "left"
        out = self.processor(text=texts, images=pics, return_tensors="pt", padding=True)
        out = {k: v.to(self.device) for k, v in out.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    @torch.inference_mode()
    def generate(self, batch: list, tokens: int) -> torch.Tensor:
        inputs = self.inputs(batch)
        out = self.model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
        return out[:, inputs["input_ids"].shape[1] :]


def hf_config_max_positions(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return (config.get("text_config") or config).get("max_position_embeddings", 4096)


def timed(device: str, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run_side(gen, device: str, pics, output_tokens: int, batch: int) -> dict:
    """The three workloads through `gen(prompts, tokens)` (a list of images or None)."""
    fresh = images(6, seed=4321)
    ttft = [timed(device, lambda im=im: gen([im], 1)) for im in fresh]
    one, many = (timed(device, lambda n=n: gen([None], n)) for n in (2, 66))
    start = time.perf_counter()
    for i in range(0, len(pics), batch):
        gen(pics[i : i + batch], output_tokens)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "ttft_ms": statistics.median(ttft[1:]) * 1e3,
        "decode_ms_per_token": (many - one) / 64 * 1e3,
        "images_s": len(pics) / seconds,
        "output_tokens_s": len(pics) * output_tokens / seconds,
        "caption_images": len(pics),
    }


def phase_floor_ms(phases: dict, peak: float) -> float:
    """A TTFT's floor from its phases (`ttft_floor`'s `ttft_phases`): each one's larger of
    weights read and FLOPs at `peak` (TFLOP/s), summed, since the decoder's first layer needs
    the tower's last layer's output and the weights do not fit in cache."""
    return sum(max(ph["weights_ms"], ph["tflop"] / peak * 1e3) for ph in phases.values())


def flop_counter():
    """torch's FLOP counter, counting also `_addmm_activation` (the towers' fc1 + bias + GELU
    in one cuBLASLt GEMM, `vit.MLP`), which torch's table leaves out: SigLIP's fc1 is ~1.1
    TFLOP of Gemma 3's 896 px tower."""
    from torch.utils import flop_counter

    def fused_addmm(bias, a, b, *args, out_shape=None, **kwargs) -> int:  # beta, alpha, gelu
        return flop_counter.addmm_flop(bias, a, b)

    extra = {torch.ops.aten._addmm_activation: fused_addmm}
    return flop_counter.FlopCounterMode(display=False, custom_mapping=extra)


def ttft_floor(llm, bandwidth: float, peak: float) -> dict:
    """Weights read and FLOPs of one 448x448 image's prefill, per phase: the tower (its FLOPs
    counted by `flop_counter` as it runs eagerly: matmuls, and attention where it takes SDPA;
    our Triton kernel's are not counted; all its weights), then the decoder (2 x the parameters
    each prompt token touches, the LM head once; every weight the step reads, the chosen
    experts of all tokens). The floor sums each phase's larger term (`phase_floor_ms`)."""
    from unittest.mock import patch

    from polymodal.encoders.graphs import EncoderGraphs

    model = llm.engine.runner.model
    prompt = llm.process({"messages": chat(images(1)[0])})
    # eager: a CUDA-graph replay runs no aten op the counter would see (it counted 0 tower
    # FLOPs for Gemma 3 once its tower had graphs)
    eager = patch.object(EncoderGraphs, "__call__", lambda graphs, *args: graphs.tower(*args))
    with torch.inference_mode(), flop_counter() as counter, eager:
        model.encode(prompt.mm_items)
    size = next(model.parameters()).element_size()
    tokens, head = len(prompt.token_ids), model.lm_head.weight.numel()
    per_token = active_decoder_bytes(model, 1) / size - head
    tower = sum(p.numel() for p in model.vision.parameters()) * size
    phases = {
        "tower": {"tflop": counter.get_total_flops() / 1e12, "weights_ms": tower / bandwidth * 1e3},
        "decoder": {
            "tflop": 2 * (per_token * tokens + head) / 1e12,
            "weights_ms": active_decoder_bytes(model, tokens) / bandwidth * 1e3,
        },
    }
    return {
        "prompt_tokens": tokens,
        "ttft_phases": phases,
        "ttft_tflop": sum(ph["tflop"] for ph in phases.values()),
        "ttft_weights_ms": sum(ph["weights_ms"] for ph in phases.values()),
        "ttft_floor_ms": phase_floor_ms(phases, peak / 1e12),
    }


def ttft_profile(llm, ours, calls: int = 3) -> dict:
    """Kernels of `calls` fresh-image TTFTs (processing included): the GPU span of the tower
    and of the decoder, busy vs wall, the kernels that cost most, where the GPU idles."""
    from polymodal.bench.profile import calls_profile, print_calls_profile

    runner = llm.engine.runner
    methods = [(runner.model, "encode", "vision encoder"), (runner.model, "forward", "decoder")]
    if runner.prefill_graphs is not None:
        methods.append((runner.prefill_graphs, "run", "decoder graphs"))
    fresh = iter(images(calls, seed=8765))
    out = calls_profile(lambda: ours([next(fresh)], 1), calls, methods)
    print_calls_profile(f"TTFT of one fresh image ({calls} calls)", out)
    return out


def run_bench(args) -> dict:
    """The bench (see the module docstring); returns the results."""
    from polymodal import LLM, SamplingParams

    model_dir = user_checkpoint(Path(resolve_bench_model(args.model)))
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results: dict = {"model": str(args.model), "device": device}
    results["output_tokens"] = args.output_tokens
    hf = None if args.skip_hf else HFRunner(model_dir, device, dtype)
    if hf is not None and device == "cuda":
        hf.model.to("cpu")
        torch.cuda.empty_cache()
    max_len = min(4096, hf_config_max_positions(model_dir))
    llm = LLM(
        str(model_dir), dtype=str(dtype).split(".")[-1], device=device, dummy_weights=True,
        max_model_len=max_len, gpu_memory_utilization=0.85, enable_prefix_caching=False,
    )  # fmt: skip
    if hf is not None:  # the very tensors transformers runs
        llm.engine.runner.model.load_weights(hf.model.state_dict().items(), "transformers")

    def ours(batch, tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        prompts = [{"messages": chat(im)} for im in batch]
        return llm.generate(prompts, params, use_tqdm=False)

    pics = images(args.images)
    ours([images(1, seed=77)[0]], 2)  # warm (LLM warmed up too on CUDA)
    results["ours"] = run_side(ours, device, pics, args.output_tokens, len(pics))
    if device == "cuda":
        from polymodal.bench.engine import measure_bandwidth
        from polymodal.bench.media import matmul_tflops

        bandwidth = measure_bandwidth()
        model = llm.engine.runner.model
        results["decode_floor_ms"] = active_decoder_bytes(model, 1) / bandwidth * 1e3
        results["matmul_tflops"] = args.peak_tflops or matmul_tflops()
        results.update(ttft_floor(llm, bandwidth, results["matmul_tflops"] * 1e12))
        if args.profile:
            results["ttft_profile"] = ttft_profile(llm, ours)
    if hf is not None:
        del llm
        if device == "cuda":
            torch.cuda.empty_cache()
            hf.model.to("cuda")
        hf.generate([images(1, seed=77)[0]], 2)
        gen = hf.generate
        results["hf"] = run_side(gen, device, pics[: args.hf_images], args.output_tokens,
                                 args.hf_batch)  # fmt: skip
        results["speedup"] = {
            "captioning": results["ours"]["images_s"] / results["hf"]["images_s"],
            "ttft": results["hf"]["ttft_ms"] / results["ours"]["ttft_ms"],
            "decode": results["hf"]["decode_ms_per_token"] / results["ours"]["decode_ms_per_token"],
        }
    return results


def print_table(r: dict) -> None:
    """TTFT against its floor, batch-1 decode against its floor, captioning; ours next to
    transformers' where it ran."""
    ours, hf = r["ours"], r.get("hf", {})
    print(f"\n{r['model']} ({r['device']}): ours vs transformers, same tensors")
    rows = [
        ("TTFT ms (one 448x448 image)", "ttft_ms"),
        ("batch-1 decode ms/token", "decode_ms_per_token"),
        (f"captioning images/s ({r['output_tokens']} tokens)", "images_s"),
    ]
    for label, key in rows:
        theirs = f"{hf[key]:12.2f}" if key in hf else " " * 12
        print(f"  {label:40s} {ours[key]:10.2f} {theirs}")
    if "ttft_floor_ms" in r:
        ttft, decode = r["ttft_floor_ms"], r["decode_floor_ms"]
        rate = r.get("matmul_tflops", DATASHEET_TFLOPS)
        peak = phase_floor_ms(r["ttft_phases"], DATASHEET_TFLOPS)
        split = ", ".join(
            f"{name} {ph['tflop']:.2f} TFLOP / {ph['weights_ms']:.2f} ms of weights"
            for name, ph in r["ttft_phases"].items()
        )
        print(
            f"  floors: TTFT {ttft:.2f} ms ({split}; at {rate:.0f} TFLOP/s, "
            f"{r['prompt_tokens']} prompt tokens): {ours['ttft_ms'] / ttft:.2f}x "
            f"({ours['ttft_ms'] / peak:.2f}x at the datasheet's {DATASHEET_TFLOPS:.0f}); "
            f"decode {decode:.2f} ms: {decode / ours['decode_ms_per_token']:.0%}"
        )
    if "speedup" in r:
        s = r["speedup"]
        print(
            f"  vs transformers: captioning {s['captioning']:.1f}x, TTFT {s['ttft']:.2f}x, "
            f"decode {s['decode']:.1f}x"
        )
