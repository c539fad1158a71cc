"""The server process of `scripts/bench_frontend.py`: `polymodal serve`'s app and uvicorn with
a fake model step installed in the engine process (`AsyncEngine(engine_setup=...)`).

    python scripts/frontend_server.py --checkpoint DIR --port N --period-ms 27 \
        --step-log steps.txt --streams 256 --tokens 128 --engine model|synthetic

`--engine model`: the decoder's forward returns its input and the tower returns zeros; the
scheduler, sampler and detokenizer still run. `--engine synthetic`: the engine's request
handling is replaced too (one token per running request a step). Each step is paced to
`--period-ms`, and one line per step goes to `--step-log`.
"""

from __future__ import annotations

import argparse
import time
from functools import partial


# ---- the fake model (runs in the engine process) --------------------------------------------
def fake_model_step(period_ms: float, step_log: str, llm) -> None:
    """Install the fake model in `llm`: no decoder or tower compute, steps paced to
    `period_ms`; one line per step goes to `step_log` (monotonic clock, shared by processes):
    `entered worked due left tokens running`."""
    import torch

    engine = llm.engine
    model = engine.runner.model
    weight = model.embed(torch.zeros(1, dtype=torch.long))
    hidden, dtype = weight.shape[-1], weight.dtype
    model.forward = lambda positions, embeds, kv_caches, meta: embeds  # [num_tokens, hidden]
    model.encode = lambda items: [torch.zeros(it.num_embeds, hidden, dtype=dtype) for it in items]
    step, period = engine.step, period_ms / 1e3
    log = open(step_log, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    # As with async scheduling on a GPU: each call launches the next step before it returns
    # this one's outputs, so the device runs steps back to back while the host's work between
    # calls (emitting outputs, taking new requests) overlaps it. A call returns when its
    # step's device time is over; the next step starts then, or when launched if later.
    state = {"next_due": 0.0, "launched": False}

    def paced_step(*args, **kwargs):
        entered = time.monotonic()
        due = state["next_due"] if state["launched"] else entered + period
        outputs = step(*args, **kwargs)
        worked = time.monotonic()
        state["next_due"] = max(due, worked) + period
        state["launched"] = engine.has_unfinished()
        if worked < due:
            time.sleep(due - worked)
        left = time.monotonic()
        tokens = sum(len(c.delta_token_ids) for out in outputs for c in out.outputs)
        running = len(engine.scheduler.running)
        log.write(f"{entered:.6f} {worked:.6f} {due:.6f} {left:.6f} {tokens} {running}\n")
        return outputs

    engine.step = paced_step


def synthetic_engine(period_ms: float, step_log: str, llm) -> None:
    """Replace the engine's request handling itself (not just the model): each running
    request gets one token a step, with its text and a `RequestOutput` as the engine builds
    them, but no scheduler, sampler or detokenizer runs. What is left in the engine process
    is the frontend's share: the media workers, the engine loop, the outbox and the wire."""
    from polymodal.llm_core.outputs import (
        CompletionOutput,
        RequestMetrics,
        RequestOutput,
        Timings,
        Usage,
    )

    engine = llm.engine
    words = "The quick brown fox jumps over the lazy dog, and then it runs away again."
    ids = engine.tokenizer.encode(" " + words, add_special_tokens=False)
    pieces = [(engine.tokenizer.decode([i]), i) for i in ids]
    running: dict[str, list] = {}  # id -> [prompt ids, max tokens, text, token ids, times]

    def add_request(prompt_token_ids, params=None, request_id=None, *args, **kwargs):
        now = time.monotonic()
        running[request_id] = [list(prompt_token_ids), params.max_tokens or 16, "", [], now,
                               time.time(), None]  # fmt: skip
        return request_id

    def step(finished_only=False):
        outputs, now, wall = [], time.monotonic(), time.time()
        for request_id, r in list(running.items()):
            prompt, limit, text, token_ids, arrival, arrival_wall, first = r
            piece, token = pieces[len(token_ids) % len(pieces)]
            r[2] = text = text + piece
            token_ids.append(token)
            r[6] = first = first or now
            done = len(token_ids) >= limit
            if done:
                del running[request_id]
            if finished_only and not done:
                continue
            out = CompletionOutput(0, text, token_ids[:], "length" if done else None, None,
                                   None, piece, [token])  # fmt: skip
            outputs.append(RequestOutput(
                request_id, prompt, [out], done, Usage(len(prompt), len(token_ids)),
                Timings(first - arrival, now - arrival if done else None), None, None,
                RequestMetrics(arrival_wall, arrival_wall, arrival_wall + first - arrival,
                               wall, wall if done else None),
            ))  # fmt: skip
        return outputs

    engine.add_request = add_request
    engine.step = step
    engine.abort = lambda request_id: running.pop(request_id, None)
    engine.has_unfinished = lambda: bool(running)
    fake_model_step(period_ms, step_log, llm)  # pacing and the step record
    engine.scheduler.running = running  # the step record's running count (ids only)


def serve(args) -> None:
    """The server process: `polymodal serve`'s app and uvicorn, the fake model inside."""
    from polymodal.async_engine import AsyncEngine
    from polymodal.server.app import create_app
    from polymodal.server.cli import serve_app

    engine = AsyncEngine(
        args.checkpoint,
        engine_setup=partial(
            synthetic_engine if args.engine == "synthetic" else fake_model_step,
            args.period_ms,
            args.step_log,
        ),
        device="cpu",
        dtype="float32",
        num_kv_blocks=args.streams * (args.tokens // 16 + 8),
        max_num_seqs=args.streams,
        max_num_batched_tokens=16384,
    )
    app = create_app(engine, "bench")
    try:
        serve_app(app, "127.0.0.1", args.port, "warning")
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--period-ms", type=float, default=27.0)
    parser.add_argument("--step-log", required=True)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--engine", choices=["model", "synthetic"], default="model")
    serve(parser.parse_args())


if __name__ == "__main__":
    main()
