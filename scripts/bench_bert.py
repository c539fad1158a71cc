"""BERT-base sequence classification throughput (issue 16): ours against transformers on the
same random weights, in the same run.

    python scripts/bench_bert.py                       # CUDA, bf16, 64 x 128 tokens, 4096 prompts
    python scripts/bench_bert.py --device cpu --tiny --prompts 64   # smoke test

A `BertForSequenceClassification` of bert-base-uncased's sizes (12 layers, hidden 768, 2
labels) is built by transformers with random weights and saved; ours loads that folder.
Ours: every prompt handed to the engine at once (`Engine.add_requests` of token ids, as
`LLM.classify` queues them; `--add-each`: one `Engine.add_request` each), the engine batches
them; transformers: `model(input_ids)` in batches of `--batch` (sdpa, the
same dtype). Both report sequences/s over `--prompts` prompts of `--tokens` random ids (the
best of three passes after a warm-up), and the largest difference of their class
probabilities (a sanity check; the parity tests are tests/llm_core/test_pooling.py).
"""

from __future__ import annotations

import argparse
import json
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


def ours_rate(
    path: str, prompts: list, device: str, dtype: str, each: bool = False
) -> tuple[float, list]:
    engine = Engine(path, dtype=dtype, device=device, skip_tokenizer_init=True)

    def add(batch: list) -> list[str]:
        if each:
            return [engine.add_request(p, PoolingParams()) for p in batch]
        return engine.add_requests(batch, PoolingParams())

    add(prompts[:1024])  # warm-up: full steps and a partial one (kernels compiled)
    engine.run_until_done()
    best = float("inf")
    for _ in range(3):  # the best of three passes
        sync(device)
        start = time.perf_counter()
        ids = add(prompts)
        final = engine.run_until_done()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return len(prompts) / best, [final[i].outputs.data.float().cpu() for i in ids]


@torch.inference_mode()
def hf_rate(model, prompts: list, batch: int, device: str) -> tuple[float, list]:
    def run(chunk):
        return model(torch.tensor(chunk, device=device)).logits.float().softmax(-1).cpu()

    run(prompts[:batch])
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        outs = [run(prompts[i : i + batch]) for i in range(0, len(prompts), batch)]
        sync(device)
        best = min(best, time.perf_counter() - start)
    return len(prompts) / best, list(torch.cat(outs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 64")
    parser.add_argument("--add-each", action="store_true", help="one add_request per prompt")
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
        ours, ours_out = ours_rate(tmp, prompts, args.device, dtype_name, args.add_each)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    model = model.to(device=args.device, dtype=dtype)
    hf, hf_out = hf_rate(model, prompts, args.batch, args.device)
    diff = max(float((a - b).abs().max()) for a, b in zip(ours_out, hf_out))
    results = {"device": args.device, "prompts": args.prompts, "tokens": args.tokens,
               "ours_seq_s": ours, "hf_seq_s": hf, "speedup": ours / hf,
               "max_prob_diff": diff}  # fmt: skip
    print(json.dumps(results, indent=2))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
