"""`polymodal bench` (the `engine` workload): our engine vs transformers on the same weights.

Workloads: (a) batch-1 decode tokens/s against the HBM floor measured in the same
run; (b) time to first token for one 448x448 image + 32 text tokens; (c) offline captioning
of N 448x448 images with 128 forced output tokens; (d) the same through transformers.
`--dummy-weights` builds the shipped Qwen2.5-VL-7B architecture from config.json alone
(random bf16 weights, nothing downloaded); transformers gets the very same tensors.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict


def measure_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import torch

    n = int(gib * (1 << 30)) // 2
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16).repeat(2)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n * 2 / statistics.median(times[2:])


def run_bench(args) -> dict:
    import torch

    from polymodal.bench import resolve_bench_model
    from polymodal.bench.workloads import OurSide, decoder_bytes, images
    from polymodal.llm_core import pdl

    if not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device")
    model_dir = resolve_bench_model(args.model)
    results: dict = {
        "card": torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "model": str(args.model),
        "torch": torch.__version__,
    }
    pdl.set_enabled(args.pdl)  # before any kernel compiles or a graph is captured
    bandwidth = measure_bandwidth()
    results["hbm_copy_tb_s"] = bandwidth / 1e12
    hf = None
    if not args.skip_hf:
        from polymodal.bench.hf import HFSide

        hf = HFSide(model_dir)
        # Each side runs with the GPU to itself: transformers waits on the host while ours is
        # built (from its tensors, as from a checkpoint) and measured.
        hf.model.to("cpu")
        torch.cuda.empty_cache()
    quantization = getattr(args, "quantization", None)
    kv_dtype = getattr(args, "kv_cache_dtype", "auto")
    ours = OurSide(
        model_dir,
        dummy_weights=args.dummy_weights or quantization is not None,
        weights_from=None if quantization else hf and hf.model,  # quantized: random weights
        async_scheduling=args.async_scheduling,
        decode_gemv=args.gemv,
        quantization=quantization,
        kv_cache_dtype=kv_dtype,
        speculative_config=getattr(args, "speculative_config", None),
    )
    results["quantization"] = quantization
    results["kv_cache_dtype"] = kv_dtype
    results["kv_cache_blocks"] = ours.engine.runner.kv_caches[0].shape[1]
    results["async_scheduling"] = args.async_scheduling
    results["decode_gemv"] = args.gemv
    results["pdl"] = args.pdl
    floor_ms = decoder_bytes(ours.model) / bandwidth * 1e3
    results["decode_floor_ms"] = floor_ms
    pics = images(args.images)
    # Warm-up outside every timed window: Triton compiles a kernel variant per new shape
    # class on first use (seconds on a fresh machine with an empty ~/.triton cache). 64 images
    # fill a whole token budget and mixed prefill + decode steps, as the captioning run does.
    ours.caption(images(64, seed=77), 8)
    ours.ttft_ms(None, repeats=2)
    spec = ours.engine.speculation
    results["ours"] = {
        # with drafts a step yields several tokens: time them per token of wall time
        "decode_ms_per_token": (ours.decode_wall_ms if spec else ours.decode_ms)(
            args.decode_tokens
        ),
        "ttft_ms": ours.ttft_ms(pics[0]),
        **ours.caption(pics, args.output_tokens),
    }
    results["ours"]["ttft_calls_ms"] = ours.ttft_calls_ms
    if spec is not None:
        results["speculative"] = {
            "config": asdict(spec.config),
            "draft_tokens": spec.num_draft_tokens,
            "acceptance_rate": spec.num_accepted_tokens / max(1, spec.num_draft_tokens),
        }
    results["ours"]["decode_tokens_s"] = 1e3 / results["ours"]["decode_ms_per_token"]
    results["ours"]["decode_fraction_of_floor"] = floor_ms / results["ours"]["decode_ms_per_token"]
    if args.profile:
        from polymodal.bench.profile import print_profile, profile_all

        results["profile"] = profile_all(ours, images(128, seed=99))
        print_profile(results["profile"])
        busy = results["profile"]["decode_kernels"]["gpu_busy_ms_per_step"]
        # kernel time per step (profiled) against the un-profiled timed step
        results["ours"]["decode_gpu_idle_share"] = 1 - busy / results["ours"]["decode_ms_per_token"]
    if hf is not None:
        ours.free()
        hf.model.to("cuda")
        results["hf"] = {
            "decode_ms_per_token": hf.decode_ms(64),
            "ttft_ms": hf.ttft_ms(pics[0]),
            **hf.caption(pics[: args.hf_images], args.output_tokens, args.hf_batch),
        }
        results["hf"]["decode_tokens_s"] = 1e3 / results["hf"]["decode_ms_per_token"]
        results["speedup"] = {
            k: results["ours"][k] / results["hf"][k] for k in ("images_s", "output_tokens_s")
        }
        results["speedup"]["decode"] = (
            results["hf"]["decode_ms_per_token"] / results["ours"]["decode_ms_per_token"]
        )
        results["speedup"]["ttft"] = results["hf"]["ttft_ms"] / results["ours"]["ttft_ms"]
    return results


def print_table(r: dict) -> None:
    """The short table the issue asks for (full numbers are in the JSON)."""
    print(f"\n{r['card']}  {r['date']}  {r['model']}  HBM copy {r['hbm_copy_tb_s']:.2f} TB/s")
    print(f"decode floor (decoder bytes / HBM) {r['decode_floor_ms']:.2f} ms/token")
    if r.get("speculative"):
        spec = r["speculative"]
        print(
            f"speculative {spec['config']}: {spec['draft_tokens']} drafts checked, "
            f"{spec['acceptance_rate']:.0%} accepted (decode is wall time per token)"
        )
    if r.get("quantization") or r.get("kv_cache_dtype", "auto") != "auto":
        print(
            f"quantization {r.get('quantization') or 'none'} (transformers: bf16), KV cache "
            f"{r.get('kv_cache_dtype')} ({r.get('kv_cache_blocks')} blocks)"
        )
    rows = [
        ("batch-1 decode tok/s", "decode_tokens_s", "{:.1f}"),
        ("TTFT ms (448px + 32 tok)", "ttft_ms", "{:.1f}"),
        ("captioning images/s", "images_s", "{:.2f}"),
        ("captioning output tok/s", "output_tokens_s", "{:.0f}"),
    ]
    hf = r.get("hf", {})
    print(f"{'metric':28s} {'polymodal':>10s} {'transformers':>13s}")
    for label, key, fmt in rows:
        ours = fmt.format(r["ours"][key])
        ref = fmt.format(hf[key]) if key in hf else "-"
        print(f"{label:28s} {ours:>10s} {ref:>13s}")
    print(f"decode fraction of floor: {r['ours']['decode_fraction_of_floor']:.1%}")
    calls = r["ours"].get("ttft_calls_ms", [])[1:]  # the first call warms up
    if calls:
        split = {k: statistics.median(c[k] for c in calls) for k in calls[0]}
        print("TTFT split, median ms: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
    if "decode_gpu_idle_share" in r["ours"]:
        print(f"GPU idle between decode steps: {r['ours']['decode_gpu_idle_share']:.1%}")
    if "speedup" in r:
        print(
            "speedup vs transformers: "
            + ", ".join(f"{k} {v:.1f}x" for k, v in r["speedup"].items())
        )
