"""BERT-base sequence classification throughput (issue 16): ours against transformers on the
same random weights, in the same run.

    python scripts/bench_bert.py                       # CUDA, bf16, 64 x 128 tokens, 4096 prompts
    python scripts/bench_bert.py --device cpu --tiny --prompts 64 --passes 2   # smoke test

A `BertForSequenceClassification` of bert-base-uncased's sizes (12 layers, hidden 768, 2
labels) is built by transformers with random weights and saved; ours loads that folder.
Both sides start from the same Python lists of token ids (what a tokenizer returns) and end
with every prompt's class probabilities on the host:
- ours: every prompt handed to the engine at once (`Engine.add_requests`, as `LLM.classify`
  queues them; `--add-each`: one `Engine.add_request` each), the engine batches them;
- transformers: batches of `--batch` prompts, each turned into a tensor
  (`torch.tensor(list)`), copied to the device without waiting, `model(input_ids)` (sdpa, the
  same dtype) and its softmax left on the device; one copy to the host at the end (no sync per
  batch, so the host runs ahead of the GPU: transformers at its best in eager mode).
Passes alternate (ours, transformers, ours, ...) after a warm-up of each, so clock or load
drift hits both alike; each side reports sequences/s of its best pass and its median, and
the largest difference of the class probabilities (a sanity check; the parity tests are
tests/llm_core/test_pooling.py). `--profile` (CUDA): then the kernels of one pass of each side
(GPU busy against wall time, the kernels that cost most, where the GPU idles).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.pooling import PoolingParams

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, num_labels=2)  # fmt: skip
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=256, num_labels=2)  # fmt: skip


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn, *args) -> tuple[float, list]:
    """(seconds, result) of `fn(*args)`, the device idle before and done after."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - start, out


def ours_pass(engine: Engine, prompts: list, each: bool) -> list:
    """Every prompt through the engine; their probabilities, in order."""
    if each:
        ids = [engine.add_request(p, PoolingParams()) for p in prompts]
    else:
        ids = engine.add_requests(prompts, PoolingParams())
    final = engine.run_until_done()
    return [final[i].outputs.data for i in ids]


@torch.inference_mode()
def hf_pass(model, prompts: list, batch: int, device: str) -> list:
    """Every prompt through transformers in batches; their probabilities, in order."""
    probs = []
    for i in range(0, len(prompts), batch):
        input_ids = torch.tensor(prompts[i : i + batch]).to(device, non_blocking=True)
        probs.append(model(input_ids).logits.float().softmax(-1))
    return list(torch.cat(probs).cpu())


def rates(times: list[float], n: int) -> dict[str, float]:
    """Sequences/s of the best pass and of the median one."""
    return {"best": n / min(times), "median": n / statistics.median(times)}


def profile(engine: Engine, model, prompts: list, args) -> dict:
    """Kernel tables of one pass of each side (`polymodal.bench.profile.calls_profile`)."""
    from polymodal.bench.profile import calls_profile, print_calls_profile

    out = {}
    sides = (
        ("ours", lambda: ours_pass(engine, prompts, args.add_each),
         [(engine.runner.model, "forward", "encoder")]),
        ("transformers", lambda: hf_pass(model, prompts, args.batch, args.device),
         [(model, "forward", "forward")]),
    )  # fmt: skip
    for name, fn, methods in sides:
        out[name] = calls_profile(fn, 1, methods)
        print_calls_profile(f"{name}: one pass of {len(prompts)} prompts", out[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=5, help="timed passes of each side")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 64")
    parser.add_argument("--add-each", action="store_true", help="one add_request per prompt")
    parser.add_argument("--profile", action="store_true", help="kernels of one pass each (CUDA)")
    parser.add_argument("--json", default="bench_bert.json")
    args = parser.parse_args()
    import transformers as tf

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = tf.BertConfig(**(TINY if args.tiny else BASE))
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    vocab = config.vocab_size
    prompts = torch.randint(1000, vocab, (args.prompts, args.tokens), generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        dtype_name = str(dtype).split(".")[-1]
        engine = Engine(tmp, dtype=dtype_name, device=args.device, skip_tokenizer_init=True)
    model = model.to(device=args.device, dtype=dtype)
    # warm-up: full steps and a partial one (kernels compiled), transformers' batch shapes
    warm = prompts[: min(len(prompts), 1024 + 64)]
    ours_pass(engine, warm, args.add_each)
    hf_pass(model, warm[: 4 * args.batch], args.batch, args.device)
    ours_times, hf_times = [], []
    for _ in range(args.passes):  # alternated: drift hits both sides alike
        seconds, ours_out = timed(args.device, ours_pass, engine, prompts, args.add_each)
        ours_times.append(seconds)
        seconds, hf_out = timed(args.device, hf_pass, model, prompts, args.batch, args.device)
        hf_times.append(seconds)
    ours, hf = rates(ours_times, len(prompts)), rates(hf_times, len(prompts))
    diff = max(float((a.float().cpu() - b).abs().max()) for a, b in zip(ours_out, hf_out))
    results = {"device": args.device, "prompts": args.prompts, "tokens": args.tokens,
               "ours_seq_s": ours["best"], "hf_seq_s": hf["best"],
               "speedup": ours["best"] / hf["best"],
               "ours_median_seq_s": ours["median"], "hf_median_seq_s": hf["median"],
               "median_speedup": ours["median"] / hf["median"],
               "max_prob_diff": diff}  # fmt: skip
    if args.profile and args.device == "cuda":
        results["profile"] = profile(engine, model, prompts, args)
    print(json.dumps({k: v for k, v in results.items() if k != "profile"}, indent=2))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
