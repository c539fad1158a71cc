"""Host (Python) cost of one engine step, with the model's forward stubbed out.

The GPU sits idle while the host schedules, builds inputs and books outputs, so this number
is the floor of the idle gap between decode steps. Runs on the CPU with a tiny checkpoint:

    python scripts/bench_host.py [--batch 1 256] [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from polymodal.demo_model import write_demo_checkpoint
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
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
