"""`polymodal serve` as a real process on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
import zlib

import pytest
from PIL import Image

from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import API_KEY, png_data_url, running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(300)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

NUM_KV_BLOCKS = 512


def bomb_data_url(width: int = 30000, height: int = 30000) -> str:
    """A tiny PNG whose header claims `width` x `height` (valid CRC; pixel data is not)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a running server on the tiny qwen2_vl checkpoint (stopped after the module)."""
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    log_dir = tmp_path_factory.mktemp("server")
    with running_server(ckpt, log_dir, "--num-kv-blocks", str(NUM_KV_BLOCKS)) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(url)
        if state["running"] == 0 and state["waiting"] == 0:
            return state
        time.sleep(0.2)
    pytest.fail(f"server still busy after {timeout}s: {health(url)}")


def test_openai_client_chat_text_and_image(server):
    c = client(server)
    models = c.models.list()
    model = models.data[0].id
    for content in (
        "Describe a cat.",
        [
            {"type": "image_url", "image_url": {"url": png_data_url()}},
            {"type": "text", "text": "What is in this image?"},
        ],
    ):
        messages = [{"role": "user", "content": content}]
        full = c.chat.completions.create(
            model=model, messages=messages, max_tokens=10, temperature=0
        )
        text = full.choices[0].message.content
        assert full.choices[0].finish_reason in ("length", "stop") and text
        assert full.usage.completion_tokens <= 10 and full.usage.prompt_tokens > 5
        stream = c.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert streamed == text
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    image_tokens = full.usage.prompt_tokens
    text_only = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is in this image?"}], max_tokens=1
    )
    assert image_tokens > text_only.usage.prompt_tokens  # the image filled slots


def test_sampling_params_logprobs_n_and_completions(server):
    c = client(server)
    out = c.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=4,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        n=2,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1},
    )
    assert [ch.index for ch in out.choices] == [0, 1]
    for choice in out.choices:
        entries = choice.logprobs.content
        assert 1 <= len(entries) <= 4
        assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    again = c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4,
        temperature=0.8, top_p=0.9, seed=7, n=2, presence_penalty=0.5, frequency_penalty=0.2,
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1},
    )  # fmt: skip
    assert [ch.message.content for ch in again.choices] == [
        ch.message.content for ch in out.choices
    ]  # seeded
    comp = c.completions.create(model="m", prompt="Once upon", max_tokens=5, temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 5


async def _stream_chat(url: str, prompt: str, max_tokens: int, disconnect_after: int | None):
    """Stream one chat request with httpx; stop reading (and close) after N events if asked."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": disconnect_after is not None,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    text, events = "", 0
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                text += "".join(ch["delta"].get("content") or "" for ch in chunk["choices"])
                events += 1
                if disconnect_after is not None and events >= disconnect_after:
                    return None  # leaving the block closes the connection midway
    return text


def _metric(url: str, series: str) -> float:
    """The value of one series (name plus labels, as exported) on /metrics; 0 if absent."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.rsplit(" ", 1)[0] == series:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


ABORTED = 'polymodal:requests_total{endpoint="chat",status="aborted"}'


def test_concurrent_streams_with_disconnects_free_all_blocks(server):
    start = wait_idle(server)
    assert start["free_kv_blocks"] == start["total_kv_blocks"] == NUM_KV_BLOCKS
    aborted_before = _metric(server, ABORTED)
    prompts = [f"Request number {i}: tell me about item {i * 7}." for i in range(32)]
    leavers = set(range(0, 32, 4))  # 8 clients disconnect midway
    c = client(server)
    alone = {
        i: c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
        for i, p in enumerate(prompts)
        if i not in leavers
    }

    async def burst():
        jobs = [
            _stream_chat(server, p, 1000 if i in leavers else 12, 3 if i in leavers else None)
            for i, p in enumerate(prompts)
        ]
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout=150)

    results = asyncio.run(burst())
    for i, text in enumerate(results):
        if i not in leavers:
            assert text == alone[i], f"request {i} differs from its solo run"
    end = wait_idle(server, timeout=60)
    assert end["free_kv_blocks"] == start["free_kv_blocks"]
    assert _metric(server, "polymodal:kv_free_blocks") == NUM_KV_BLOCKS
    assert _metric(server, ABORTED) - aborted_before == len(leavers)


def test_bad_requests_get_4xx_and_server_keeps_serving(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    post = lambda body, **kw: httpx.post(  # noqa: E731
        f"{server}/v1/chat/completions", headers=headers, timeout=60, **kw, json=body
    )
    bad_json = httpx.post(
        f"{server}/v1/chat/completions", headers=headers, content=b"{not json", timeout=30
    )
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    missing = post({"model": "m"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    user = [{"role": "user", "content": "hi"}]
    bad_top_p = post({"messages": user, "top_p": 5}).json()["error"]
    assert bad_top_p["param"] == "top_p" and "top_p" in bad_top_p["message"]
    bad_logprobs = post({"messages": user, "logprobs": True, "top_logprobs": 99})
    assert bad_logprobs.status_code == 400
    assert bad_logprobs.json()["error"]["param"] == "top_logprobs"
    bomb = [
        {"type": "image_url", "image_url": {"url": bomb_data_url()}},
        {"type": "text", "text": "what is this?"},
    ]
    for stream in (False, True):
        resp = post({"messages": [{"role": "user", "content": bomb}], "stream": stream})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert "900000000 pixels exceeds the limit" in err["message"] and err["param"] == "messages"
    local = [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]
    resp = post({"messages": [{"role": "user", "content": local}]})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "messages[0].content[0].image_url.url"
    no_key = httpx.post(f"{server}/v1/chat/completions", json={"messages": user}, timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    ok = post({"messages": user, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert wait_idle(server)["free_kv_blocks"] == NUM_KV_BLOCKS


def test_non_streaming_disconnect_aborts(server):
    start = wait_idle(server)
    aborted_before = _metric(server, ABORTED)
    body = {
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=httpx.Timeout(30, read=0.5),
        )
    assert wait_idle(server)["free_kv_blocks"] == start["free_kv_blocks"]
    assert _metric(server, ABORTED) == aborted_before + 1


def test_metrics_have_millisecond_buckets_and_request_phases(server):
    """TTFT, inter-token latency, queue/prefill/decode times (vLLM's names), buckets from 1 ms."""
    ttft_before = _metric(server, "polymodal:time_to_first_token_seconds_count")

    async def two_streams():
        jobs = [_stream_chat(server, f"Phases {i}.", 8, None) for i in range(2)]
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout=120)

    asyncio.run(two_streams())
    wait_idle(server)
    assert _metric(server, "polymodal:time_to_first_token_seconds_count") == ttft_before + 2
    first_bucket = 'polymodal:time_to_first_token_seconds_bucket{le="0.001"}'
    exported = httpx.get(f"{server}/metrics", timeout=10).text
    assert first_bucket in exported
    for name in ("inter_token_latency", "request_queue_time", "request_prefill_time",
                 "request_decode_time", "request_time_per_output_token",
                 "request_preprocess_time", "request_first_token_delivery"):  # fmt: skip
        assert _metric(server, f"polymodal:{name}_seconds_count") > 0, name
    # the four parts of a TTFT, each a share of it: their sums within the TTFTs' sum
    parts = sum(_metric(server, f"polymodal:request_{name}_seconds_sum") for name in (
        "preprocess_time", "queue_time", "prefill_time", "first_token_delivery"))  # fmt: skip
    assert 0 < parts <= _metric(server, "polymodal:time_to_first_token_seconds_sum") * 1.05
    assert _metric(server, "polymodal:generation_tokens_total") > 0
    assert 0 <= _metric(server, "polymodal:kv_cache_usage_perc") <= 1


def test_64_concurrent_image_streams_match_offline_and_free_every_block(server, tmp_path_factory):
    """The server's media path (processed in the engine process, off the event loop) under 64
    concurrent streamed image requests: every response arrives, each equals `LLM.generate` on
    the same request in this process, and every KV block is free afterwards."""
    from polymodal import LLM, SamplingParams

    start = wait_idle(server)
    urls = [png_data_url(40 + i % 9, 30 + i % 7, (i * 37 % 256, 90, 200)) for i in range(64)]

    def messages(url: str, i: int) -> list[dict]:
        parts = [{"type": "image_url", "image_url": {"url": url}}]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": f"Image {i}?"}]}]

    async def one(http, i: int) -> str:
        body = {"model": "m", "messages": messages(urls[i], i), "max_tokens": 6,
                "temperature": 0, "stream": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {API_KEY}"}
        text = ""
        async with http.stream("POST", f"{server}/v1/chat/completions", json=body,
                               headers=headers) as resp:  # fmt: skip
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    text += "".join(ch["delta"].get("content") or "" for ch in chunk["choices"])
        return text

    async def burst():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(timeout=200, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(64))), 250)

    served = asyncio.run(burst())
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2_vl")), num_kv_blocks=256)
    offline = [
        {
            "role": m["role"],
            "content": [
                {"type": "image", "image": p["image_url"]["url"]} if p["type"] == "image_url" else p
                for p in m["content"]
            ],
        }  # fmt: skip
        for i in range(64)
        for m in messages(urls[i], i)
    ]
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = [out.outputs[0].text for out in llm.generate([[m] for m in offline], params)]
    assert served == expected
    assert wait_idle(server, timeout=60)["free_kv_blocks"] == start["free_kv_blocks"]


def test_continuous_usage_stats_in_every_chunk(server):
    """vLLM's `stream_options.continuous_usage_stats`: every chunk carries the counts so far
    (completion tokens growing to the final usage); without it, only the last chunk."""
    c, cat = client(server), [{"role": "user", "content": "Describe a cat."}]
    for route in ("chat", "completion"):
        options = {"include_usage": True, "continuous_usage_stats": True}
        if route == "chat":
            stream = c.chat.completions.create(model="m", messages=cat, max_tokens=6,
                                               stream=True, stream_options=options)  # fmt: skip
        else:
            stream = c.completions.create(model="m", prompt="Once upon a time", max_tokens=6,
                                          stream=True, stream_options=options)  # fmt: skip
        chunks = list(stream)
        with_choices = [ch for ch in chunks if ch.choices]
        assert all(ch.usage is not None for ch in with_choices)
        counts = [ch.usage.completion_tokens for ch in with_choices]
        assert counts == sorted(counts) and counts[-1] == chunks[-1].usage.completion_tokens
        assert all(ch.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for ch in chunks)
    plain = c.chat.completions.create(model="m", messages=cat, max_tokens=6, stream=True,
                                      stream_options={"include_usage": True})  # fmt: skip
    assert all(ch.usage is None for ch in list(plain) if ch.choices)
