"""AsyncEngine: concurrent streams, per-request errors, step failures, aborts free blocks."""

from __future__ import annotations

import asyncio
import os

import pytest

from polymodal import LLM, MediaError, SamplingParams
from polymodal.async_engine import AsyncEngine
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = AsyncEngine(LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2_vl")), num_kv_blocks=256))
    yield eng
    eng.close()


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _collect(engine: AsyncEngine, prompt, params=GREEDY):
    request_id = engine.submit(prompt, params)
    return [out async for out in engine.stream(request_id)]


async def _wait_idle(engine: AsyncEngine) -> None:
    for _ in range(200):
        s = engine.stats
        if s.num_running == 0 and s.num_waiting == 0 and not engine.engine.has_unfinished():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats}")


def test_concurrent_streams_match_offline_generate(engine):
    prompts = [f"Tell me about number {i}." for i in range(6)]

    async def main():
        return await asyncio.gather(*(_collect(engine, p) for p in prompts))

    streams = run(main())
    for outs in streams:
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].text
    alone = [run(_collect(engine, p))[-1].text for p in prompts]
    assert [outs[-1].text for outs in streams] == alone


def test_bad_media_fails_only_its_request(engine):
    bad = {"messages": [{"role": "user", "content": [{"type": "image", "image": b"not png"}]}]}

    async def main():
        good_id = engine.submit("A good prompt", GREEDY)
        bad_id = engine.submit(bad, GREEDY)
        with pytest.raises(MediaError, match="image 1"):
            async for _ in engine.stream(bad_id):
                pass
        return [out async for out in engine.stream(good_id)]

    assert run(main())[-1].finished


def test_step_failure_fails_that_step_and_loop_survives(engine):
    free = engine.engine.num_free_blocks
    runner = engine.engine.runner
    original = runner.launch
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in step")
        return original(*args)

    runner.launch = flaky
    try:
        with pytest.raises(RuntimeError, match="boom in step"):
            run(_collect(engine, "this one hits the failing step"))
        outs = run(_collect(engine, "this one runs after it"))
    finally:
        runner.launch = original
    assert outs[-1].finished and engine.stats.num_failed_steps >= 1
    run(_wait_idle(engine))
    assert engine.engine.num_free_blocks == free


def test_abort_and_early_break_free_blocks(engine):
    free = engine.engine.num_free_blocks
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)

    async def main():
        # consumer stops early -> aborted
        request_id = engine.submit("keep talking", long)
        async for out in engine.stream(request_id):
            if len(out.outputs[0].token_ids) >= 3:
                break
        # explicit abort -> the stream ends without a finished output
        other = engine.submit("keep talking too", long)
        seen = []
        async for out in engine.stream(other):
            seen.append(out)
            if len(seen) == 2:
                engine.abort(other)
        assert not seen[-1].finished
        # cancelled consumer task -> aborted
        third = engine.submit("and you", long)
        task = asyncio.create_task(_drain(engine, third))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_idle(engine)

    run(main())
    assert engine.engine.num_free_blocks == free


async def _drain(engine: AsyncEngine, request_id: str) -> None:
    async for _ in engine.stream(request_id):
        pass


def test_a_stream_that_fell_behind_gets_the_waiting_steps_merged(engine):
    """A consumer that reads late gets one output for the steps it missed: deltas joined, the
    same text and token ids as reading every step."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def main():
        request_id = engine.submit("Count slowly.", params)
        first = None
        outs = []
        async for out in engine.stream(request_id):
            if first is None:
                first = out
                while engine.engine.has_unfinished():  # let the engine run ahead of us
                    await asyncio.sleep(0.01)
            outs.append(out)
        return outs

    outs = run(main())
    alone = run(_collect(engine, "Count slowly.", params))
    assert len(outs) < len(alone)  # steps were merged...
    assert "".join(o.outputs[0].delta_text for o in outs) == alone[-1].text  # ...losing nothing
    ids = [t for o in outs for t in o.outputs[0].delta_token_ids]
    assert ids == alone[-1].outputs[0].token_ids


def test_engine_process_serves_like_the_engine_in_process(engine, tmp_path_factory):
    """Given a path, the engine runs in its own process: the same tokens as in-process, errors
    per request, stats and freed blocks reach the parent; a dead child fails every open
    request instead of hanging it; a model that does not load raises at construction."""
    import signal
    import time

    from polymodal import ModelNotFoundError
    from polymodal.engine_process import EngineDiedError

    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    remote = AsyncEngine(ckpt, num_kv_blocks=256)
    try:
        assert remote.engine is None and remote.tokenizer is not None
        prompts = [f"Tell me about number {i}." for i in range(4)]
        bad = {"messages": [{"role": "user", "content": [{"type": "image", "image": b"junk"}]}]}

        async def main():
            with pytest.raises(MediaError, match="image 1"):
                await remote.generate(bad, GREEDY)
            return await asyncio.gather(*(_collect(remote, p) for p in prompts))

        streams = run(main())
        local = [run(_collect(engine, p))[-1].outputs[0].token_ids for p in prompts]
        assert [outs[-1].outputs[0].token_ids for outs in streams] == local
        for _ in range(100):  # stats arrive from the child after its last step
            if remote.stats.num_free_blocks == remote.stats.num_total_blocks == 256:
                break
            time.sleep(0.05)
        assert remote.stats.num_free_blocks == 256 and remote.stats.num_waiting == 0

        async def dies():
            params = SamplingParams(max_tokens=2000, ignore_eos=True)
            request_id = remote.submit("Talk forever.", params)
            seen = []
            with pytest.raises(EngineDiedError):
                async for out in remote.stream(request_id):
                    seen.append(out)
                    if len(seen) == 2:
                        os.kill(remote._core._process.pid, signal.SIGKILL)
            return seen

        assert len(run(dies())) >= 2
        assert not remote.alive
    finally:
        remote.close()
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        AsyncEngine(str(tmp_path_factory.mktemp("x") / "no-such-model"))
