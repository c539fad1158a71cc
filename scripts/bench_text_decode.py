"""Text-only decoder bench (`polymodal bench TEXT-MODEL`, `polymodal.bench.text`) with this
script's older flags; device scripts import its helpers (`variant_ms`) from here.

    python scripts/bench_text_decode.py qwen3-30b-a3b [--hf] [--prompts 512] [--tokens 128]
    python scripts/bench_text_decode.py deepseek-v3-reduced --hf
    python scripts/bench_text_decode.py mixtral-8x7b            # transformers' copy won't fit
"""

from __future__ import annotations

import argparse
import json

from polymodal.bench.text import (  # noqa: F401  (device scripts import these from here)
    decode_ms,
    run_bench,
    throughput,
    variant_ms,
)


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
    bench = argparse.Namespace(
        model=args.model, skip_hf=not args.hf, dummy_weights=True, images=args.prompts,
        output_tokens=args.tokens, hf_images=args.hf_prompts, hf_batch=32, decode_tokens=256,
        profile=args.profile,
    )  # fmt: skip
    results = run_bench(bench)
    print(json.dumps(results, indent=2))
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
