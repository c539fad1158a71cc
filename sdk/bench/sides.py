"""The two sides of a family bench (`bench/whisper.py`, `bench/phi4mm.py`): transformers'
model (`hf_model`: random weights or the checkpoint's; ours then loads its very tensors), and
the timing of a side: `generate(batch_of_inputs, tokens) -> output tokens of each`, run on a
list of inputs in batches, and on single fresh inputs for the latency of one request alone."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def hf_model(cls, model_dir, device: str, dtype: torch.dtype, random_weights: bool):
    """transformers' `cls` (sdpa attention) on `device`: from config.json with small random
    weights (seeded), or the checkpoint's."""
    import transformers as tf

    tf.logging.set_verbosity_error()  # generate's notes on max_length and the mask
    if not random_weights:
        model = cls.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()
    config = tf.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    for param in model.parameters():  # small weights: finite at any depth
        if param.dim() >= 2:
            param.data.normal_(0.0, 0.02)
    return model.eval()


def results_header(args, device: str, dtype: torch.dtype, random_weights: bool, **fields) -> dict:
    """What a family bench reports first: the model, device, dtype, tokens a request, whether
    the weights are random, date, versions (and `fields`)."""
    import time

    results = {
        "model": str(args.model), "device": device, "dtype": str(dtype).split(".")[-1],
        "output_tokens": args.output_tokens, "random_weights": random_weights, **fields,
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
    }  # fmt: skip
    if device == "cuda":
        results["card"] = torch.cuda.get_device_name()
    return results


def park(model: torch.nn.Module, device: str) -> None:
    """transformers' model to host memory while ours is built and measured (each side has the
    device to itself; it comes back after `free_device`)."""
    if device == "cuda":
        model.to("cpu")
        torch.cuda.empty_cache()


def free_device(device: str) -> None:
    """Give the memory of a side just dropped back (the engine's reference cycles first), so
    the other side has the device to itself."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_counts(counts: list[int], tokens: int, what: str) -> None:
    """Every request decoded exactly `tokens` tokens (else the two sides did different work)."""
    if any(c != tokens for c in counts):
        raise RuntimeError(f"{what}: output tokens per request {counts}, expected {tokens} each")


def run_side(
    generate: Callable[[list, int], list[int]],
    device: str,
    inputs: list,
    tokens: int,
    batch: int,
    fresh: list,
    what: str,
) -> dict:
    """Requests/s over `inputs` (in batches of `batch`) and the median latency of one `fresh`
    input alone, every request checked to decode exactly `tokens` tokens."""
    latency = []
    for item in fresh:
        sync(device)
        start = time.perf_counter()
        counts = generate([item], tokens)
        sync(device)
        latency.append(time.perf_counter() - start)
        check_counts(counts, tokens, what)
    start = time.perf_counter()
    for i in range(0, len(inputs), batch):
        check_counts(generate(inputs[i : i + batch], tokens), tokens, what)
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "requests": len(inputs),
        "seconds": seconds,
        "requests_s": len(inputs) / seconds,
        "output_tokens_s": len(inputs) * tokens / seconds,
        "latency_ms": statistics.median(latency) * 1e3,
    }


def print_rows(ours: dict, hf: dict, unit: str) -> None:
    """The rows both sides report, ours next to transformers' (`-` where it did not run)."""
    rows = [(f"{unit}/s", "requests_s", "{:.2f}"), ("output tok/s", "output_tokens_s", "{:.0f}"),
            (f"latency ms (one {unit[:-1]})", "latency_ms", "{:.1f}"),
            (f"{unit} run", "requests", "{}")]  # fmt: skip
    print(f"{'metric':28s} {'polymodal':>10s} {'transformers':>13s}")
    for label, key, fmt in rows:
        ref = fmt.format(hf[key]) if key in hf else "-"
        print(f"{label:28s} {fmt.format(ours[key]):>10s} {ref:>13s}")


def speedup(ours: dict, hf: dict) -> dict:
    """Ours over transformers': throughput and one request's latency."""
    return {
        "requests_s": ours["requests_s"] / hf["requests_s"],
        "latency": hf["latency_ms"] / ours["latency_ms"],
    }
