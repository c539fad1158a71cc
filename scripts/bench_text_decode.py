"""Text-only decoder bench for the MoE / MLA architectures (the `polymodal bench` engine
workload is Qwen-VL-shaped): batch-1 decode against its floor, and captioning-style
throughput (N prompts x M forced tokens) against transformers on the same tensors.

    python scripts/bench_text_decode.py qwen3-30b-a3b [--hf] [--prompts 512] [--tokens 128]
    python scripts/bench_text_decode.py deepseek-v3-reduced --hf
    python scripts/bench_text_decode.py mixtral-8x7b            # transformers' copy won't fit

A built-in name is a shipped config run with random bf16 weights. The floor is
`active_decoder_bytes(model, 1)` (attention, the chosen experts, shared experts, the head) /
the HBM copy bandwidth measured in the same run. With `--hf` transformers' model is built first
(random weights), ours loads its very tensors, and transformers runs after ours is freed, at
batch 32 on a subset of the prompts (its rate does not depend on the count).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

from polymodal.bench import resolve_bench_model
from polymodal.bench.workloads import active_decoder_bytes, text_ids
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.sampling_params import SamplingParams


def hf_model(model_dir):
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(model_dir)
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
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    for i in range(prompts):
        engine.add_request(text_ids(32, 100 + i, vocab), params)
    engine.run_until_done()
    return prompts * tokens / (time.perf_counter() - start)


def variant_ms(label: str, model_dir, bandwidth: float, **config) -> float:
    """One engine (dummy bf16 weights, `config` more EngineConfig fields) built, warmed and
    timed at batch-1 decode (best of two runs of 256 tokens after 32), then freed: prints
    `label`, ms a token and % of its floor at `bandwidth` bytes/s. Device scripts A/B code
    variants in one process with it (scripts/device/gemma_*.py)."""
    config = EngineConfig(dtype="bfloat16", dummy_weights=True, skip_tokenizer_init=True,
                          gpu_memory_utilization=0.85, enable_prefix_caching=False,
                          **config)  # fmt: skip
    engine = Engine(str(model_dir), config)
    vocab = engine.model_config.vocab_size
    floor_ms = active_decoder_bytes(engine.runner.model, 1) / bandwidth * 1e3
    throughput(engine, vocab, 16, 8)  # warm-up
    ms = min(decode_ms(engine, vocab) for _ in range(2))
    print(f"{label:30s} {ms:.3f} ms  floor {floor_ms:.3f}  {100 * floor_ms / ms:.1f}%", flush=True)
    del engine
    gc.unfreeze()  # the engine froze the heap at build (gc.freeze): its cycles go now
    gc.collect()
    torch.cuda.empty_cache()
    time.sleep(1)
    return ms


def hf_throughput(model, vocab, prompts, tokens, batch=32) -> float:
    ids = torch.tensor([text_ids(32, 100 + i, vocab) for i in range(batch)], device="cuda")
    start = time.perf_counter()
    for _ in range(max(1, prompts // batch)):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    torch.cuda.synchronize()
    return max(1, prompts // batch) * batch * tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--hf", action="store_true", help="transformers on the same tensors")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hf-prompts", type=int, default=64)
    parser.add_argument("--json", default="bench_text.json")
    parser.add_argument("--profile", action="store_true", help="kernel table of decode steps")
    args = parser.parse_args()
    from polymodal.bench.engine import measure_bandwidth

    model_dir = resolve_bench_model(args.model)
    results = {"model": args.model, "hbm_copy_tb_s": measure_bandwidth() / 1e12}
    hf = hf_model(model_dir) if args.hf else None
    if hf is not None:
        hf.to("cpu")
        torch.cuda.empty_cache()
    config = EngineConfig(dtype="bfloat16", dummy_weights=True, skip_tokenizer_init=True,
                          max_model_len=4096, gpu_memory_utilization=0.85,
                          enable_prefix_caching=False)  # fmt: skip
    engine = Engine(str(model_dir), config)
    if hf is not None:
        engine.runner.model.load_weights(hf_tensors(hf), "transformers model")
    vocab = engine.model_config.vocab_size
    floor_bytes = active_decoder_bytes(engine.runner.model, 1)
    results["decode_floor_ms"] = floor_bytes / (results["hbm_copy_tb_s"] * 1e12) * 1e3
    throughput(engine, vocab, 64, 8)  # warm-up: Triton compiles, mixed steps
    results["decode_ms"] = decode_ms(engine, vocab)
    results["decode_of_floor"] = results["decode_floor_ms"] / results["decode_ms"]
    if args.profile:
        results["decode_profile"] = decode_profile(engine, vocab)
    results["tokens_s"] = throughput(engine, vocab, args.prompts, args.tokens)
    del engine
    torch.cuda.empty_cache()
    if hf is not None:
        hf.to("cuda")
        results["hf_tokens_s"] = hf_throughput(hf, vocab, args.hf_prompts, args.tokens)
        results["speedup"] = results["tokens_s"] / results["hf_tokens_s"]
    print(json.dumps(results, indent=2))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
