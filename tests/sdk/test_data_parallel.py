"""Data parallelism (`AsyncEngine(..., data_parallel_size=2)`, `polymodal serve
--data-parallel-size 2`) on CPU engine processes: every request completes with `LLM`'s greedy
tokens, both ranks take work, aborts free their rank's blocks, control calls and options reach
every rank, the server reports the summed KV pool; each rank's GPUs are its own."""

from __future__ import annotations

import asyncio

import pytest

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.async_engine import AsyncEngine
from polymodal.data_parallel import rank_environments
from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import post, tiny_server

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
KWARGS = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64, "enable_sleep_mode": True}


async def _collect(engine, prompt, params=GREEDY):
    return [out async for out in engine.stream(engine.submit(prompt, params))]


def test_requests_spread_and_match_llm(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    prompts = [f"Tell me about number {i}." for i in range(8)]
    want = [o.outputs[0].token_ids for o in LLM(path, **KWARGS).generate(prompts, GREEDY)]
    engine = AsyncEngine(path, data_parallel_size=2, **KWARGS)
    try:
        cores = engine._core
        seen = []
        submit = cores.submit
        cores.submit = lambda rid, *a: (submit(rid, *a), seen.append(cores._owner.get(rid)))

        async def main():
            outs = await asyncio.gather(*(_collect(engine, p) for p in prompts))
            # an aborted request frees its blocks on its own rank
            rid = engine.submit("a long one", SamplingParams(max_tokens=500, ignore_eos=True))
            stream = engine.stream(rid)
            await stream.__anext__()  # it runs
            await stream.aclose()  # the stream's end aborts it
            for _ in range(200):  # its rank's END comes back: no request open anywhere
                if not cores._owner and engine.stats.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            sleeping = await engine.control("is_sleeping")
            return outs, sleeping

        outs, sleeping = asyncio.run(asyncio.wait_for(main(), 120))
        assert [o[-1].outputs[0].token_ids for o in outs] == want
        assert set(seen) == {0, 1}  # both ranks took requests
        assert cores._open == [0, 0] and not cores._owner
        assert sleeping is False
        total = engine.stats.num_total_blocks
        assert total == 2 * cores.cores[0].stats.num_total_blocks
        assert engine.stats.num_free_blocks == total  # the abort freed its blocks
    finally:
        engine.close()


def test_rank_gpus():
    assert rank_environments(2, {"device": "cpu"}) == [{}, {}]
    import os

    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = "3,5,6,7"
    try:
        envs = rank_environments(2, {"tensor_parallel_size": 2})
        assert envs == [{"CUDA_VISIBLE_DEVICES": "3,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
        with pytest.raises(InvalidInputError, match="needs 6 GPUs; 4 are visible"):
            rank_environments(3, {"tensor_parallel_size": 2})
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old
    with pytest.raises(InvalidInputError, match="needs engine processes"):
        AsyncEngine(LLM.__new__(LLM), data_parallel_size=2)


def test_server_with_two_ranks(tmp_path_factory):
    pytest.importorskip("fastapi")
    args = ("--data-parallel-size", "2", "--num-kv-blocks", "32", "--device", "cpu")
    with tiny_server(tmp_path_factory, *args, arch="qwen2") as url:
        import httpx

        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["total_kv_blocks"] == 64
        body = {"model": "m", "prompt": ["Hello", "there", "again"], "max_tokens": 5,
                "temperature": 0}  # fmt: skip
        resp = post(url, "/v1/completions", body)
        assert resp.status_code == 200 and len(resp.json()["choices"]) == 3
        assert post(url, "/tokenize", {"prompt": "Hello"}).status_code == 200


def test_prefix_routing_keeps_a_conversation_on_its_rank():
    import threading

    from polymodal.data_parallel import SLACK, DataParallelCores, prefix_key

    calls = []

    class FakeCore:
        def __init__(self, rank):
            self.rank = rank

        def submit(self, request_id, *args):
            calls.append(self.rank)

    cores = object.__new__(DataParallelCores)  # the routing alone: no engine processes
    cores.cores = [FakeCore(r) for r in range(3)]
    cores._lock, cores._owner, cores._open = threading.Lock(), {}, [0, 0, 0]
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    later = [*first, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    cores.submit("a", {"messages": first}, None)
    cores.submit("b", {"messages": later}, None)
    assert calls[0] == calls[1]  # every turn of a conversation meets its prefix cache
    home = calls[0]
    cores._open[home] += SLACK + 1  # an overloaded home gives the request away
    cores.submit("c", {"messages": later}, None)
    assert calls[2] != home and cores._owner["c"] == calls[2]
    assert prefix_key("x" * 600) == prefix_key("x" * 512 + "y")  # a long shared text prefix
    assert prefix_key([1, 2, 3]) != prefix_key([1, 2, 4])
    assert prefix_key({"prompt_embeds": None}) is None  # no key: the least loaded rank
