"""Decode throughput of batches mixing constrained and free requests (issue 14): the same
batch of text prompts with 0%, 50% and 100% of its requests under a regex grammar, on the
Qwen2.5-VL-7B decoder (dummy bf16 weights, the shipped config, Qwen's real vocabulary so
xgrammar compiles against 151k tokens).

    python scripts/bench_structured.py                 # 64 requests x 128 tokens
    python scripts/bench_structured.py --requests 256 --tokens 64

The grammar is `[a-z]{512}`: every token of the 128 is constrained (a token holds at least one
character, so the grammar cannot end first) and its mask is not trivial (letters only). The
target is the 50% row within a few percent of the free row: masks built off the critical path
and applied on the GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from polymodal.bench.checkpoint import write_user_checkpoint
from polymodal.llm import LLM
from polymodal.llm_core.sampling_params import SamplingParams, StructuredOutputsParams

CONFIG = Path(__file__).resolve().parents[1] / "sdk" / "configs" / "qwen2_5_vl_7b"
GRAMMAR = "[a-z]{512}"


def params(constrained: bool, tokens: int) -> SamplingParams:
    rule = StructuredOutputsParams(regex=GRAMMAR) if constrained else None
    return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                          structured_outputs=rule)  # fmt: skip


def run(llm: LLM, requests: int, tokens: int, share: float) -> tuple[float, int]:
    """Seconds for the batch and the tokens it produced, `share` of requests constrained."""
    prompts = [f"Write about topic number {i}." for i in range(requests)]
    chosen = [params(i < share * requests, tokens) for i in range(requests)]
    start = time.perf_counter()
    outputs = llm.generate(prompts, chosen, use_tqdm=False)
    seconds = time.perf_counter() - start
    made = sum(len(o.outputs[0].token_ids) for o in outputs)
    for out, p in zip(outputs, chosen):
        text = out.outputs[0].text
        if p.structured_outputs is not None and not (text.isalpha() and text.islower()):
            raise SystemExit(f"constrained output broke the grammar: {text[:80]!r}")
    return seconds, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", help="a checkpoint folder (default: the 7B config, dummy)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            llm = LLM(args.model, max_model_len=1024)
        else:
            ckpt = write_user_checkpoint(CONFIG, Path(tmp) / "ckpt")
            llm = LLM(str(ckpt), dummy_weights=True, dtype="bfloat16", max_model_len=4096)
        run(llm, 8, 16, 0.5)  # warm-up: graphs, the grammar compiler, the mask kernels
        rows = []
        for share in (0.0, 0.5, 1.0):
            runs = [run(llm, args.requests, args.tokens, share) for _ in range(3)]
            seconds = sorted(s for s, _ in runs)[1]
            rows.append((share, runs[0][1] / seconds))
    free = rows[0][1]
    print(f"{'constrained':>11} {'tokens/s':>9} {'vs free':>8}")
    for share, rate in rows:
        print(f"{share:11.0%} {rate:9.0f} {100 * (rate / free - 1):+7.1f}%")


if __name__ == "__main__":
    main()
