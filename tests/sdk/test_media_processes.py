"""Media processes: prompts with media loaded and tokenized in worker processes give the same
processed prompts and tokens as in-process; errors stay per request; a dead worker is
replaced; processor options reach the workers."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal import LLM, MediaError, SamplingParams
from polymodal.async_engine import AsyncEngine
from polymodal.llm_prompts import process_prompt
from polymodal.media_processes import MediaProcesses, ProcessorSpec
from tests.helpers import tiny_checkpoint

pytestmark = pytest.mark.timeout(400)

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def image_url(seed: int, size: int = 56) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_prompt(url: str, text: str = "What is this?") -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2_vl")), num_kv_blocks=256)


def test_processed_prompts_match_and_a_dead_worker_is_replaced(llm):
    media = MediaProcesses(ProcessorSpec.of(llm, 1), 1)
    try:
        media.start()
        prompt = image_prompt(image_url(0))
        assert media.takes(prompt) and not media.takes("text only")
        here = process_prompt(llm.processor, prompt, llm.media_defaults)
        there = media.submit(prompt).result(timeout=60)
        assert there.token_ids == here.token_ids and len(there.mm_items) == 1
        assert there.positions == here.positions
        mine, theirs = here.mm_items[0], there.mm_items[0]
        assert theirs.content_hash == mine.content_hash and theirs.num_slots == mine.num_slots
        assert theirs.data.keys() == mine.data.keys()
        for key, value in mine.data.items():
            assert torch.equal(theirs.data[key], value), key
        with pytest.raises(MediaError, match="image 1"):  # the worker's error, as raised here
            media.submit(image_prompt("data:image/png;base64,bm90IGFuIGltYWdl")).result(60)

        for pid in list(media._pool._processes):  # the worker dies (as on a decoder crash)
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        again = media.submit(prompt).result(timeout=120)  # retried on a fresh pool
        assert again.token_ids == here.token_ids

        url = "http://127.0.0.1:9/x.png"
        with pytest.raises(MediaError, match="allow_http"):
            media.submit(image_prompt(url)).result(60)
        media.set_option("allow_http", True)  # the workers restart with it
        with pytest.raises(MediaError, match="image 1.*cannot fetch the URL"):  # it tried
            media.submit(image_prompt(url)).result(120)
    finally:
        media.close()
    with pytest.raises(RuntimeError, match="media processes are closed"):
        media.submit(prompt).result(10)


def test_engine_process_with_media_processes_serves_like_generate(llm, tmp_path_factory):
    """The server's layout: the engine in its own process, media prompts loaded in two worker
    processes of it; the same tokens as `LLM.generate`, a bad image fails only its request,
    every block is freed."""
    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    prompts = [image_prompt(image_url(i), f"Describe image {i}.") for i in range(6)]
    prompts.append("A text prompt stays on the threads.")
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    remote = AsyncEngine(ckpt, num_kv_blocks=256, media_processes=2)
    try:
        bad = image_prompt("data:image/png;base64,bm90IGFuIGltYWdl")

        async def main():
            outs = [remote.generate(p, GREEDY) for p in prompts]
            with pytest.raises(MediaError, match="image 1"):
                await remote.generate(bad, GREEDY)
            return await asyncio.gather(*outs)

        got = asyncio.run(asyncio.wait_for(main(), 180))
        assert [o.outputs[0].token_ids for o in got] == expected
        for _ in range(100):  # stats arrive from the child after its last step
            if remote.stats.num_free_blocks == 256 and remote.stats.num_waiting == 0:
                break
            time.sleep(0.05)
        assert remote.stats.num_free_blocks == 256 and remote.stats.num_waiting == 0

        engine_pid = remote._core._process.pid  # killed: its media workers exit too
        workers = _children(engine_pid)
        assert len(workers) >= 2
        os.kill(engine_pid, signal.SIGKILL)
        for _ in range(100):
            if not any(_alive(pid) for pid in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers)
    finally:
        remote.close()


def _children(pid: int) -> list[int]:
    """The processes `pid` started (Linux: /proc)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
