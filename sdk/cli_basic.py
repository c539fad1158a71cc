"""The `demo-model` and `generate` subcommands."""

from __future__ import annotations

import argparse


def demo_model_command(parser: argparse.ArgumentParser):
    from polymodal.demo_model import ARCHITECTURES

    parser.description = "Write a tiny random-weight checkpoint (no network needed)."
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen2_vl", choices=ARCHITECTURES)
    parser.add_argument("--seed", type=int, default=0)

    def run(args) -> int:
        from polymodal.demo_model import write_demo_checkpoint

        path = write_demo_checkpoint(args.out_dir, args.arch, seed=args.seed)
        print(f"wrote a tiny random {args.arch} checkpoint to {path}")
        print("its weights are random: whatever it generates is gibberish by design")
        return 0

    return run


def generate_command(parser: argparse.ArgumentParser):
    parser.description = "Generate text for one prompt, with optional images / video."
    parser.add_argument("model", help="hub id or local checkpoint directory")
    parser.add_argument("--text", default="Describe this image.")
    parser.add_argument("--image", action="append", default=[], help="repeat for several")
    parser.add_argument("--video")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--stream", action="store_true")

    def run(args) -> int:
        from polymodal.pipeline import Pipeline

        pipe = Pipeline(
            args.model,
            device=args.device,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
        )
        request = dict(
            text=args.text,
            images=args.image or None,
            video=args.video,
            max_pixels=args.max_pixels,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
        request = {k: v for k, v in request.items() if v is not None}
        if args.stream:
            for delta in pipe.stream(**request):
                print(delta, end="", flush=True)
            print()
            return 0
        result = pipe(**request)
        print(result.text)
        print(
            f"[{result.finish_reason}; {result.usage.prompt_tokens} prompt + "
            f"{result.usage.completion_tokens} completion tokens; "
            f"{result.timings.total:.2f}s]"
        )
        return 0

    return run
