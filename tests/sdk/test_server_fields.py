"""The server as a vLLM / OpenAI user meets it: every field implemented or refused with a 400
naming it, the model name checked (404), OpenAI-shaped errors everywhere, several prompts in
one completion, echo, logit_bias, max_tokens limits, media options, generation_config.json
defaults, tokenize / detokenize, pooling routes, CORS preflight."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import openai_client, png_data_url, post, running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.timeout(300)
USER = [{"role": "user", "content": "Describe a cat."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose checkpoint's generation_config.json sets top_k=1 (greedy by default)."""
    ckpt = tmp_path_factory.mktemp("gen_config") / "model"
    shutil.copytree(tiny_checkpoint(tmp_path_factory, "qwen2_vl"), ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1}))
    args = ["--num-kv-blocks", "256", "--allowed-origins", '["https://app.example"]',
            "--enable-request-id-headers"]  # fmt: skip
    with running_server(ckpt, tmp_path_factory.mktemp("log"), *args) as url:
        yield url


def test_model_names_and_unknown_routes_are_openai_errors(server):
    c = openai_client(server)
    assert c.models.retrieve("m").id == "m"
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    assert "gpt-4o" in err.value.body["message"] and err.value.body["param"] == "model"
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)):
        resp = httpx.request(method, f"{server}{path}", timeout=30)
        assert resp.status_code == status and set(resp.json()["error"]) >= {"message", "type"}


def test_cors_preflight_of_the_real_server(server):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = httpx.options(f"{server}/v1/chat/completions", timeout=30,
                       headers={"Origin": "https://app.example", **preflight})  # fmt: skip
    assert (
        ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    )
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    denied = httpx.options(f"{server}/v1/chat/completions", timeout=30,
                           headers={"Origin": "https://evil.example", **preflight})  # fmt: skip
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
    # a cross-origin call from the allowed origin gets the header on the answer itself
    models = httpx.get(f"{server}/v1/models", headers={"Origin": "https://app.example"}, timeout=30)
    assert models.headers["access-control-allow-origin"] == "https://app.example"


def test_unsupported_fields_get_a_400_naming_them(server):
    cases = [
        ("/v1/chat/completions", {"messages": USER, "frobnicate": 1}, "frobnicate"),
        ("/v1/chat/completions", {"messages": USER, "max_pixels": 100}, "max_pixels"),
        ("/v1/chat/completions", {"messages": USER, "audio": {}}, "audio"),
        ("/v1/completions", {"prompt": "a", "suffix": "z"}, "suffix"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content",
        ),
    ]
    for path, body, param in cases:
        resp = post(server, path, body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"].startswith(param) and param.split("[")[0] in error["message"]
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        openai_client(server).chat.completions.create(model="m", messages=USER, logit_bias={"x": 1})


def test_max_tokens_zero_and_too_large(server):
    for field in ("max_tokens", "max_completion_tokens"):
        resp = post(server, "/v1/chat/completions", {"messages": USER, field: 0})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field
    resp = post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 1_000_000})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"
    assert "maximum context length is 2048" in resp.json()["error"]["message"]
    echo = post(server, "/v1/completions", {"prompt": "Once upon", "max_tokens": 0, "echo": True})
    assert echo.status_code == 200 and echo.json()["choices"][0]["text"] == "Once upon"
    assert echo.json()["usage"]["completion_tokens"] == 1  # computed, not returned (vLLM)


def test_logit_bias_makes_greedy_output_that_token(server):
    out = openai_client(server).completions.create(
        model="m", prompt="Hello", max_tokens=5, temperature=0, logit_bias={"77": 100}, logprobs=0
    )
    assert out.usage.completion_tokens == 5
    assert out.choices[0].logprobs.tokens == [_decode(server, [77])] * 5
    plain = openai_client(server).completions.create(
        model="m", prompt="Hello", max_tokens=5, temperature=0, logprobs=0
    )
    assert plain.choices[0].logprobs.tokens != out.choices[0].logprobs.tokens


def _decode(server, ids):
    return post(server, "/detokenize", {"tokens": ids}).json()["prompt"]


def test_several_prompts_and_token_id_lists(server):
    c = openai_client(server)
    prompts = ["Once upon a time", "The sky is"]
    alone = [
        c.completions.create(model="m", prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in prompts
    ]
    both = c.completions.create(model="m", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [ch.index for ch in both.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in both.choices] == [alone[0], alone[0], alone[1], alone[1]]
    ids = [post(server, "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    by_ids = c.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0)
    assert [ch.text for ch in by_ids.choices] == alone
    stream = c.completions.create(
        model="m", prompt=prompts, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts = {0: "", 1: ""}
    chunks = list(stream)
    for chunk in chunks:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
    assert [texts[0], texts[1]] == alone
    assert chunks[-1].usage.prompt_tokens == both.usage.prompt_tokens


def test_echo_and_prompt_logprobs(server):
    c = openai_client(server)
    out = c.completions.create(model="m", prompt="Once upon", max_tokens=3, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith("Once upon")
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token has none
    assert len(choice.logprobs.tokens) == out.usage.prompt_tokens + 3
    messages = [*USER, {"role": "assistant", "content": "The cat"}]
    chat = c.chat.completions.create(
        model="m", messages=messages, max_tokens=3,
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True},
    )  # fmt: skip
    assert chat.choices[0].message.content.startswith("The cat")


def test_tokenize_detokenize_and_model_card(server):
    ids = post(server, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert ids["count"] == len(ids["tokens"]) == len(ids["token_strs"]) > 0
    assert _decode(server, ids["tokens"]) == "Hello world"
    image = {"type": "image_url", "image_url": {"url": png_data_url()}}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}]
    text_only = [{"role": "user", "content": "What?"}]
    counts = [
        post(server, "/tokenize", {"messages": m}).json()["count"] for m in (with_image, text_only)
    ]
    assert counts[0] > counts[1]
    bad = post(server, "/detokenize", {"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def _png(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_media_options_change_the_prompt(server):
    c = openai_client(server)
    url = _png(448)

    def prompt_tokens(part_extra=None, **extra_body):
        part = {"type": "image_url", "image_url": {"url": url}, **(part_extra or {})}
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}]
        out = c.chat.completions.create(
            model="m", messages=messages, max_tokens=1, extra_body=extra_body or None
        )
        return out.usage.prompt_tokens

    default = prompt_tokens()
    small = prompt_tokens(mm_processor_kwargs={"max_pixels": 112 * 112})
    assert small < default
    assert prompt_tokens({"max_pixels": 112 * 112}) == small  # qwen-vl-utils per-part option
    assert prompt_tokens({"image_url": {"url": url, "detail": "high"}}) == default
    bad = post(server, "/v1/chat/completions", {
        "messages": USER, "mm_processor_kwargs": {"resize": 2}, "max_tokens": 1,
    })  # fmt: skip
    assert bad.status_code == 400 and "resize" in bad.json()["error"]["message"]


def _mp4_data_url(frames: int = 36, rate: int = 12) -> str:
    """A 3 s 64x48 H.264 clip (a moving gradient) as a data: URL, written with PyAV."""
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        ramp = np.add.outer(np.arange(48), np.arange(64)).astype(np.uint8)
        for i in range(frames):
            frame = np.stack([ramp + 5 * i, ramp, 255 - ramp], axis=-1)  # [H, W, 3]
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def test_per_request_fps_changes_the_video_prompt(server):
    c = openai_client(server)
    url = _mp4_data_url()

    def prompt_tokens(part_extra=None, **extra_body):
        part = {"type": "video_url", "video_url": {"url": url}, **(part_extra or {})}
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}]
        out = c.chat.completions.create(
            model="m", messages=messages, max_tokens=1, extra_body=extra_body or None
        )
        return out.usage.prompt_tokens

    default = prompt_tokens()  # 2 frames a second: 6 of the 3 s clip
    slow = prompt_tokens(mm_processor_kwargs={"fps": 1})  # at least 4 frames (Qwen's minimum)
    fast = prompt_tokens(mm_processor_kwargs={"fps": 4})  # 12 frames
    assert slow < default < fast
    assert prompt_tokens({"fps": 4}) == fast  # qwen-vl-utils per-part option
    assert prompt_tokens(mm_processor_kwargs={"num_frames": 4}) == slow
    # vLLM's media_io_kwargs: the video loader's frame count and rate, the same options
    assert prompt_tokens(media_io_kwargs={"video": {"num_frames": 4}}) == slow
    assert prompt_tokens(media_io_kwargs={"video": {"fps": 4}}) == fast
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for io_kwargs, named in (({"image": {"image_mode": "L"}}, "image.image_mode"),
                            ({"video": {"num_frames": 4}}, "'num_frames'")):  # fmt: skip
        extra = {"mm_processor_kwargs": {"num_frames": 8}} if named == "'num_frames'" else {}
        bad = post(server, "/v1/chat/completions", {**body, "media_io_kwargs": io_kwargs, **extra})
        error = bad.json()["error"]
        assert bad.status_code == 400 and named in error["message"], error
        assert error["param"] == "media_io_kwargs"


def test_generation_config_defaults_apply_unless_set(server):
    c = openai_client(server)
    greedy = c.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=0)
    # top_k=1 from generation_config.json: sampling at temperature 1 is still the argmax
    hot = [
        c.chat.completions.create(model="m", messages=USER, max_tokens=8, temperature=1.0)
        for _ in range(2)
    ]
    assert {h.choices[0].message.content for h in hot} == {greedy.choices[0].message.content}
    free = {
        c.chat.completions.create(
            model="m", messages=USER, max_tokens=8, temperature=1.0, seed=s,
            extra_body={"top_k": -1}, user="someone",
        ).choices[0].message.content
        for s in range(4)
    }  # fmt: skip
    assert len(free) > 1


def test_best_of_returns_the_most_likely(server):
    c = openai_client(server)
    args = dict(model="m", prompt="Once", max_tokens=4, temperature=1.0, seed=3, logprobs=0)
    three = c.completions.create(n=3, extra_body={"top_k": -1, "ignore_eos": True}, **args)
    sums = [sum(ch.logprobs.token_logprobs) for ch in three.choices]
    best = c.completions.create(best_of=3, extra_body={"top_k": -1, "ignore_eos": True}, **args)
    assert len(best.choices) == 1 and best.usage.completion_tokens == 12
    assert best.choices[0].text == three.choices[sums.index(max(sums))].text


def test_pooling_routes_say_the_model_is_generative(server):
    with pytest.raises(openai.BadRequestError, match="not a pooling model"):
        openai_client(server).embeddings.create(model="m", input="hello")
    for path in ("/pooling", "/classify", "/score"):
        resp = post(server, path, {"model": "m", "input": "x"})
        assert resp.status_code == 400 and "pooling" in resp.json()["error"]["message"]


def test_beam_search_returns_n_beams(server):
    body = {"prompt": "Once upon", "max_tokens": 4, "n": 3, "use_beam_search": True}
    resp = post(server, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and len({c["text"] for c in choices}) == 3
    chat = post(server, "/v1/chat/completions", {"messages": USER, **body, "prompt": None})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "prompt"
    body = {"messages": USER, "max_tokens": 4, "n": 2, "use_beam_search": True}
    assert len(post(server, "/v1/chat/completions", body).json()["choices"]) == 2
    streamed = post(server, "/v1/chat/completions", {**body, "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"


def test_return_token_ids_request_id_and_tokens_as_ids(server):
    """vLLM's output extras: the prompt's and the choice's token ids (a stream: the prompt's in
    its first chunk, the choice's as deltas adding up to the whole), the response id from the
    caller's `request_id`, logprobs' tokens as "token_id:N"."""
    c = openai_client(server)
    prompt = "Once upon a time"
    extra = {"return_token_ids": True, "request_id": "abc123", "return_tokens_as_token_ids": True}
    out = c.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
                               extra_body=extra)  # fmt: skip
    choice = out.choices[0]
    assert out.id == "cmpl-abc123"
    assert choice.prompt_token_ids == post(server, "/tokenize", {"prompt": prompt}).json()["tokens"]
    assert len(choice.token_ids) == out.usage.completion_tokens == 6
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in choice.token_ids]
    plain = c.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    assert plain.choices[0].text == choice.text and plain.id != out.id
    assert getattr(plain.choices[0], "token_ids", None) is None
    ids_only = {"return_token_ids": True}
    chunks = list(c.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0,
                                       stream=True, extra_body=ids_only))  # fmt: skip
    assert chunks[0].choices[0].prompt_token_ids == choice.prompt_token_ids
    assert [t for ch in chunks for t in ch.choices[0].token_ids] == choice.token_ids
    chat = c.chat.completions.create(model="m", messages=USER, max_tokens=5, temperature=0,
                                     extra_body={"return_token_ids": True})  # fmt: skip
    assert len(chat.prompt_token_ids) == chat.usage.prompt_tokens
    assert len(chat.choices[0].token_ids) == chat.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="m", messages=USER, max_tokens=5,
                                            temperature=0, stream=True,
                                            extra_body={"return_token_ids": True}))  # fmt: skip
    assert chunks[0].prompt_token_ids == chat.prompt_token_ids
    assert all(getattr(ch, "prompt_token_ids", None) is None for ch in chunks[1:])
    streamed = [t for ch in chunks for choice in ch.choices for t in choice.token_ids or []]
    assert streamed == chat.choices[0].token_ids


def test_cache_salt_is_taken_and_checked(server):
    """`cache_salt` on both routes: the same answer as without (it only scopes prefix-cache
    hits: tests/sdk/test_llm_vllm_api.py); an empty salt is a 400 naming it."""
    c = openai_client(server)
    salted = {"cache_salt": "tenant-a"}
    plain = c.completions.create(model="m", prompt="Once upon", max_tokens=4, temperature=0)
    got = c.completions.create(model="m", prompt="Once upon", max_tokens=4, temperature=0,
                               extra_body=salted)  # fmt: skip
    assert got.choices[0].text == plain.choices[0].text
    chat = c.chat.completions.create(model="m", messages=USER, max_tokens=4, temperature=0)
    salted_chat = c.chat.completions.create(model="m", messages=USER, max_tokens=4,
                                            temperature=0, extra_body=salted)  # fmt: skip
    assert salted_chat.choices[0].message.content == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="m", prompt="Once", max_tokens=2, extra_body={"cache_salt": ""})
    assert "cache_salt" in err.value.body["message"]


def test_priority_needs_the_priority_policy(server):
    """This server schedules first come, first served: a non-zero `priority` is a 400 saying
    which policy it needs (tests/llm_core/test_priority_scheduling.py runs the policy)."""
    c = openai_client(server)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="m", prompt="Once", max_tokens=2, extra_body={"priority": 1})
    assert "scheduling_policy='priority'" in err.value.body["message"]
    ok = c.completions.create(model="m", prompt="Once", max_tokens=2, extra_body={"priority": 0})
    assert ok.choices[0].finish_reason == "length"


def test_ping_and_version(server):
    """vLLM's `/ping` (GET and POST: SageMaker's health check) answers as `/health`;
    `/version` gives the package's."""
    import polymodal

    health = httpx.get(f"{server}/health", timeout=10).json()
    for method in ("GET", "POST"):
        ping = httpx.request(method, f"{server}/ping", timeout=10)
        assert ping.status_code == 200 and ping.json()["status"] == health["status"] == "ok"
    assert httpx.get(f"{server}/version", timeout=10).json() == {"version": polymodal.__version__}


def test_request_id_headers(server):
    """`--enable-request-id-headers`: a response carries the request's `X-Request-Id` (and the
    completion's id is built from it, as vLLM's), or a fresh one."""
    body = {"model": "m", "prompt": "Once", "max_tokens": 2}
    given = post(server, "/v1/completions", body, headers={"X-Request-Id": "trace-7"})
    assert given.headers["x-request-id"] == "trace-7" and given.json()["id"] == "cmpl-trace-7"
    fresh = post(server, "/v1/completions", body)
    assert len(fresh.headers["x-request-id"]) == 32
    assert httpx.get(f"{server}/health", timeout=10).headers["x-request-id"]
