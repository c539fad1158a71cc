"""Host (Python) cost of one engine step, with the model's forward stubbed out.

The GPU sits idle while the host schedules, builds inputs and books outputs, so this number
is the floor of the idle gap between decode steps. Runs on the CPU with a tiny checkpoint:

    python scripts/bench_host.py [--batch 1 256] [--steps 60]
    python scripts/bench_host.py --drafters          # + each speculative drafter's steps

`--drafters` times a step that drafts (n-gram lookup, a draft model, an EAGLE-3 head, Medusa
heads, k = 3;
their forwards stubbed too) against a plain decode step, on a tiny Llama: what speculative
decoding adds to the host's side of each step (the drafts are whatever the stubs propose).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from polymodal.demo_model import write_demo_checkpoint
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams


def drafters(batches: list[int], steps: int) -> None:
    """Host ms per step and per token with each drafter (stubbed forwards)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.llm_core.eagle_reference import write_head

    root = Path(tempfile.mkdtemp())
    target = str(write_demo_checkpoint(root / "t", "llama", num_hidden_layers=4))
    head = str(write_head(root / "h", "eagle3"))
    medusa = root / "m"  # random Medusa heads: a config alone (dummy weights)
    medusa.mkdir()
    (medusa / "config.json").write_text(json.dumps({"num_heads": 3, "num_hidden_layers": 1}))
    configs = {
        "none": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
        "draft_model": {"method": "draft_model", "model": target, "num_speculative_tokens": 3},
        "eagle3": {"method": "eagle3", "model": head, "num_speculative_tokens": 3},
        "medusa": {"method": "medusa", "model": str(medusa), "num_speculative_tokens": 3},
    }
    for name, config in configs.items():
        engine = Engine(target, dtype="float32", device="cpu", num_kv_blocks=4096,
                        skip_tokenizer_init=True, max_num_seqs=max(batches),
                        speculative_config=config, dummy_weights=name == "medusa")  # fmt: skip
        for layer in engine.runner.model.model.layers:  # hooks on them still run (EAGLE-3)
            layer.forward = lambda rope, hidden, residual, kv, meta: (hidden, hidden)
        drafter = engine.runner.draft
        if name == "medusa":  # its heads run as they are (a few tiny matmuls)
            pass
        elif drafter is not None and drafter.records:  # the EAGLE head: (rows, features)
            drafter.net.forward = lambda positions, embeds, feature, kv, meta: (embeds, feature)
        elif drafter is not None:
            drafter.net.forward = lambda positions, embeds, kv, meta: embeds
        params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
        for batch in batches:
            for _ in range(2):  # a warm-up pass, then the one timed
                for _ in range(batch):
                    engine.add_request(list(range(10, 42)), params)
                for _ in range(3):
                    engine.step()
                start, count = time.perf_counter(), 0
                while engine.has_unfinished():
                    engine.step(finished_only=True)
                    count += 1
                seconds = time.perf_counter() - start
            tokens = batch * (steps - 3)  # about: the first steps are not timed
            print(json.dumps({"drafter": name, "batch": batch, "steps": count,
                              "ms_per_step": round(seconds / count * 1e3, 3),
                              "us_per_token": round(seconds / tokens * 1e6, 1)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--drafters", action="store_true", help="speculative drafters' steps")
    args = parser.parse_args()
    if args.drafters:
        drafters(args.batch, args.steps)
        return
    path = write_demo_checkpoint(tempfile.mkdtemp(), "qwen2_5_vl")
    engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=8192,
                    skip_tokenizer_init=True, max_num_seqs=max(args.batch))  # fmt: skip
    engine.runner.model.forward = lambda positions, embeds, kv, meta: embeds  # host cost only
    params = SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True)
    for batch in args.batch:
        for finished_only in (None, True, False):  # None: an untimed warm-up pass
            for _ in range(batch):
                engine.add_request(list(range(10, 42)), params)
            for _ in range(3):  # prefill + first decodes
                engine.step()
            start, steps = time.perf_counter(), 0
            while engine.has_unfinished():
                engine.step(finished_only=bool(finished_only))
                steps += 1
            ms = (time.perf_counter() - start) / steps * 1e3
            if finished_only is not None:
                kind = "finished" if finished_only else "every step"
                print(f"batch {batch:4d}  outputs {kind}: {ms:.3f} ms host per decode step")


if __name__ == "__main__":
    main()
