"""`polymodal bench TEXT-MODEL`: the bench of the text-only decoders (Gemma 3 text, the MoE
and MLA families, Llama-like checkpoints; the engine workload's prompts are Qwen-VL's).

Batch-1 decode against its floor: `active_decoder_bytes(model, 1)` (attention, the chosen
experts, shared experts, the head) over the HBM copy bandwidth measured in the same run, the
median step of one request of `--decode-tokens` after 32 prompt tokens; then captioning-style
throughput (`--images` prompts x `--output-tokens` forced tokens) against transformers on the
same tensors (`--skip-hf`: ours alone; Mixtral-8x7B's second copy does not fit one GPU).
The engine workload's `--quantization`, `--kv-cache-dtype`, `--speculative-config`,
`--[no-]async-scheduling`, `--[no-]gemv` and `--[no-]pdl` apply to our side (quantized: random
weights, as there).
transformers' model is built first (random weights), ours loads its very tensors, and
transformers runs after ours is freed, at `--hf-batch` on `--hf-images` of the prompts (its rate
does not depend on the count). A built-in name is a shipped config with random bf16 weights.

    polymodal bench gemma-3-12b --dummy-weights --skip-hf
    polymodal bench qwen3-30b-a3b --dummy-weights --images 256
"""

from __future__ import annotations

import gc
import time

import numpy as np

from polymodal.bench.workloads import active_decoder_bytes, text_ids
from polymodal.llm_core.sampling_params import SamplingParams

DEFAULTS = {"images": 512, "hf_images": 64, "hf_batch": 32}


def hf_model(model_dir):
    import torch
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        size = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
    card = torch.cuda.get_device_properties(0).total_memory
    if 2 * size > 0.9 * card:  # its bf16 copy alone
        raise SystemExit(
            f"transformers' bf16 copy of {model_dir.name} ({2 * size / 2**30:.0f} GiB) does not "
            f"fit this card ({card / 2**30:.0f} GiB): pass --skip-hf"
        )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for param in model.parameters():  # small weights: finite at any depth
        if param.dim() >= 2:
            param.data.normal_(0.0, 0.02)
    return model.eval()


def hf_tensors(model):
    """transformers' tensors under checkpoint names our loader takes (v5 keeps Mixtral's
    experts under `mlp.`; the hub and we call it `block_sparse_moe.`)."""
    mixtral = model.config.model_type == "mixtral"
    for name, tensor in model.state_dict().items():
        yield (name.replace(".mlp.", ".block_sparse_moe.") if mixtral else name), tensor


def decode_ms(engine, vocab, n=256) -> float:
    """Median wall time of a batch-1 decode step (one request, `n` tokens after 32)."""
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    engine.add_request(text_ids(32, 1, vocab), params)
    stamps = []
    while engine.has_unfinished():
        if engine.step():
            stamps.append(time.perf_counter())
    return float(np.median(np.diff(stamps[1:])) * 1e3)


def decode_profile(engine, vocab, steps=32) -> dict:
    """Kernels of `steps` batch-1 decode steps (graph replays) of one request."""
    from polymodal.bench.profile import calls_profile, print_calls_profile

    params = SamplingParams(temperature=0.0, max_tokens=steps + 16, ignore_eos=True)
    engine.add_request(text_ids(32, 1, vocab), params)
    for _ in range(4):  # the prefill and warm decode steps
        engine.step()
    out = calls_profile(engine.step, steps)
    engine.run_until_done()
    print_calls_profile(f"batch-1 decode step ({steps} steps)", out)
    return out


def throughput(engine, vocab, prompts, tokens) -> float:
    """Output tokens/s of `prompts` requests of 32 tokens x `tokens` forced ones."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    for i in range(prompts):
        engine.add_request(text_ids(32, 100 + i, vocab), params)
    engine.run_until_done()
    return prompts * tokens / (time.perf_counter() - start)


def hf_throughput(model, vocab, prompts, tokens, batch=32) -> float:
    import torch

    ids = torch.tensor([text_ids(32, 100 + i, vocab) for i in range(batch)], device="cuda")
    start = time.perf_counter()
    for _ in range(max(1, prompts // batch)):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    torch.cuda.synchronize()
    return max(1, prompts // batch) * batch * tokens / (time.perf_counter() - start)


def build_engine(model_dir, **config):
    """Our engine on `model_dir` as the bench runs it (random bf16 weights unless the folder
    holds some; no tokenizer: the prompts are ids)."""
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.engine_config import EngineConfig

    config = {"dtype": "bfloat16", "skip_tokenizer_init": True, "gpu_memory_utilization": 0.85,
              "enable_prefix_caching": False, "dummy_weights": True, **config}  # fmt: skip
    return Engine(str(model_dir), EngineConfig(**config))


def release_memory() -> None:
    """Give the GPU memory of engines no longer referenced back (call after dropping the last
    reference: a caller's local keeps an engine alive). An engine froze the heap at build
    (`gc.freeze`), so its reference cycles are collected only after `gc.unfreeze`."""
    import torch

    gc.unfreeze()
    gc.collect()
    torch.cuda.empty_cache()


def variant_ms(label: str, model_dir, bandwidth: float, **config) -> float:
    """One engine (`config`: more EngineConfig fields) built, warmed and timed at batch-1
    decode (best of two runs of 256 tokens after 32), then freed: prints `label`, ms a token
    and % of its floor at `bandwidth` bytes/s. Device scripts A/B code variants in one
    process with it (scripts/device/gemma_*.py)."""
    engine = build_engine(model_dir, **config)
    vocab = engine.model_config.vocab_size
    floor_ms = active_decoder_bytes(engine.runner.model, 1) / bandwidth * 1e3
    throughput(engine, vocab, 16, 8)  # warm-up
    ms = min(decode_ms(engine, vocab) for _ in range(2))
    print(f"{label:30s} {ms:.3f} ms  floor {floor_ms:.3f}  {100 * floor_ms / ms:.1f}%", flush=True)
    del engine
    release_memory()
    time.sleep(1)
    return ms


def run_bench(args) -> dict:
    import torch

    from polymodal.bench import resolve_bench_model
    from polymodal.bench.engine import measure_bandwidth
    from polymodal.llm_core import pdl

    if not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device")
    pdl.set_enabled(getattr(args, "pdl", True))  # before any kernel compiles
    model_dir = resolve_bench_model(args.model)
    results = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
               "model": str(args.model), "workload": "text decode",
               "hbm_copy_tb_s": measure_bandwidth() / 1e12}  # fmt: skip
    hf = None if args.skip_hf else hf_model(model_dir)
    if hf is not None:
        hf.to("cpu")  # each side has the GPU to itself
        torch.cuda.empty_cache()
    quantization = getattr(args, "quantization", None)
    engine_options = {  # the engine workload's flags (the script's defaults without them)
        "quantization": quantization,
        "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
        "speculative_config": getattr(args, "speculative_config", None),
        "async_scheduling": getattr(args, "async_scheduling", None),
        "decode_gemv": getattr(args, "gemv", True),
    }
    results.update(quantization=quantization, kv_cache_dtype=engine_options["kv_cache_dtype"])
    has_weights = any(model_dir.glob("*.safetensors"))
    dummy = args.dummy_weights or not has_weights or hf is not None or quantization is not None
    engine = build_engine(model_dir, max_model_len=4096, dummy_weights=dummy, **engine_options)
    if hf is not None and quantization is None:  # quantized: random weights, as the engine
        engine.runner.model.load_weights(hf_tensors(hf), "transformers model")  # workload
    vocab = engine.model_config.vocab_size
    floor_bytes = active_decoder_bytes(engine.runner.model, 1)
    results["decode_floor_ms"] = floor_bytes / (results["hbm_copy_tb_s"] * 1e12) * 1e3
    throughput(engine, vocab, 64, 8)  # warm-up: Triton compiles, mixed steps
    results["decode_ms"] = decode_ms(engine, vocab, args.decode_tokens)
    results["decode_of_floor"] = results["decode_floor_ms"] / results["decode_ms"]
    if args.profile:
        results["decode_profile"] = decode_profile(engine, vocab)
    results["prompts"], results["output_tokens"] = args.images, args.output_tokens
    results["tokens_s"] = throughput(engine, vocab, args.images, args.output_tokens)
    del engine
    release_memory()
    if hf is not None:
        hf.to("cuda")
        results["hf_tokens_s"] = hf_throughput(
            hf, vocab, args.hf_images, args.output_tokens, args.hf_batch
        )
        results["speedup"] = results["tokens_s"] / results["hf_tokens_s"]
    return results


def print_table(r: dict) -> None:
    print(f"\n{r['card']}  {r['date']}  {r['model']}  (text decode, HBM copy "
          f"{r['hbm_copy_tb_s']:.2f} TB/s)")  # fmt: skip
    print(f"batch-1 decode {r['decode_ms']:.3f} ms a token, floor {r['decode_floor_ms']:.3f} ms: "
          f"{r['decode_of_floor']:.1%} of the floor")  # fmt: skip
    line = f"{r['prompts']} prompts x {r['output_tokens']} tokens: {r['tokens_s']:.0f} tokens/s"
    if "hf_tokens_s" in r:
        line += f", transformers {r['hf_tokens_s']:.0f} ({r['speedup']:.1f}x)"
    print(line)
