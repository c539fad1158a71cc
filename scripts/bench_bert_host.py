"""Host cost of BERT sequence classification through the engine (issue 16), on the CPU.

    OMP_NUM_THREADS=1 python scripts/bench_bert_host.py              # 4096 x 128 tokens
    OMP_NUM_THREADS=1 python scripts/bench_bert_host.py --profile    # + cProfile's top 25

The GPU bench (`bench_bert.py`) can only be as fast as the host work per sequence allows:
add_request, scheduling, the step's inputs, the pooling and the outputs. This measures that
work alone: a one-layer BERT classifier of hidden 32 is served on the CPU with the same step
sizes as an H200 (512 sequences, 16384 tokens a step) and, by default, its embeddings and
encoder replaced by a stand-in that returns a preallocated tensor of the right shape (so the
microseconds are the engine's, not the CPU's matmuls; `--real` runs the model). Prints, for
prompts queued one `add_request` each and all at once (`add_requests`), microseconds per
sequence for adding the requests, scheduling, running the step (inputs, the stand-in,
pooling, the copy to the host) and the rest of the step (building the requests admitted,
finishing, outputs); each part's best of `--passes` passes. `first_launch_ms` is the time from
the add until the first step is launched: on a GPU the host work after it overlaps the device
(async scheduling), the work before it does not.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time

import torch

import polymodal.llm_core.engine as engine_module
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.pooling import PoolingParams

MICRO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=512, num_labels=2)  # fmt: skip


class Timed:
    """A function wrapped to add its wall time to `total` (and note when its first call of a
    pass returned: `first_end`)."""

    def __init__(self, fn):
        self.fn, self.total, self.first_end = fn, 0.0, None

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            end = time.perf_counter()
            self.total += end - start
            self.first_end = self.first_end or end


def stand_in(engine: Engine, max_tokens: int) -> None:
    """Replace the model's embeddings and encoder by views of one preallocated tensor."""
    net = engine.runner.model
    hidden = torch.zeros(max_tokens, net.config.hidden_size)
    net.embed = lambda input_ids, *rest: hidden[: input_ids.shape[0]]
    net.forward = lambda positions, embeds, kv_caches, meta: embeds


def one_pass(engine: Engine, prompts: list, timers: dict, batched: bool) -> dict:
    start = time.perf_counter()
    for t in timers.values():
        t.total, t.first_end = 0.0, None
    add_start = time.perf_counter()
    if batched:  # one call for every prompt (what LLM.classify / embed do)
        ids = engine.add_requests(prompts, PoolingParams())
    else:  # one add_request each (as scripts/bench_bert.py does)
        ids = [engine.add_request(p, PoolingParams()) for p in prompts]
    add = time.perf_counter() - add_start
    run_start = time.perf_counter()
    final = engine.run_until_done()
    run = time.perf_counter() - run_start
    assert len(final) == len(ids)
    n = len(prompts)
    us = 1e6 / n
    sched, step = timers["schedule"].total, timers["step"].total
    return {
        "add_us": add * us,
        "schedule_us": sched * us,
        "pooling_step_us": step * us,
        "rest_of_step_us": (run - sched - step) * us,
        "total_us": (time.perf_counter() - start) * us,
        "first_launch_ms": (timers["step"].first_end - add_start) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--real", action="store_true", help="run the model, not a stand-in")
    parser.add_argument("--passes", type=int, default=5, help="report each part's best pass")
    parser.add_argument("--profile", action="store_true", help="cProfile one pass")
    args = parser.parse_args()
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**MICRO)).eval()
    gen = torch.Generator().manual_seed(1)
    shape = (args.prompts, args.tokens)
    prompts = torch.randint(1000, model.config.vocab_size, shape, generator=gen).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        engine = Engine(
            tmp, dtype="float32", device="cpu", skip_tokenizer_init=True,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        )  # fmt: skip
    if not args.real:
        stand_in(engine, args.max_num_batched_tokens)
    # the pooling step's function (`run_pooling_step` before the fast path: compare commits)
    name = (
        "launch_pooling_step"
        if hasattr(engine_module, "launch_pooling_step")
        else "run_pooling_step"
    )
    step = Timed(getattr(engine_module, name))
    timers = {"schedule": Timed(engine.scheduler.schedule), "step": step}
    engine.scheduler.schedule = timers["schedule"]
    setattr(engine_module, name, step)
    results = {}
    modes = (("add_request", False), ("add_requests", True))
    for mode, batched in modes[: 2 if hasattr(engine, "add_requests") else 1]:
        one_pass(engine, prompts[:1024], timers, batched)  # warm-up
        passes = [one_pass(engine, prompts, timers, batched) for _ in range(args.passes)]
        best = {k: min(p[k] for p in passes) for k in passes[0]}  # each part's best pass
        results[mode] = {k: round(v, 2) for k, v in best.items()}
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(one_pass, engine, prompts, timers, batched)
            print(f"---- {mode}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
