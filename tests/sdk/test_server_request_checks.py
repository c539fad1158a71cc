"""Request checks of the server in-process (FastAPI's test client over a real AsyncEngine): a
body that is not JSON, options that need one another, bad values named by the request's own
field (engine errors too, in the message as well as `param`), empty prompts of a list, and
legacy completion logprobs as OpenAI returns them."""

from __future__ import annotations

import pytest

from polymodal.async_engine import AsyncEngine
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.request_checks import check_request
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from polymodal.server.app import create_app  # noqa: E402

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    eng = AsyncEngine(
        str(tiny_checkpoint(tmp_path_factory, "qwen2")), separate_process=False, num_kv_blocks=128
    )
    with TestClient(create_app(eng, "m")) as test_client:
        yield test_client
    eng.close()


def error_of(resp, status=400) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_a_body_that_is_not_json_is_named_as_such(client):
    resp = client.post(
        "/v1/chat/completions",
        content=b'{"messages": [',
        headers={"content-type": "application/json"},
    )
    error = error_of(resp)
    assert error["param"] is None and error["code"] == "json_invalid"
    assert error["message"].startswith("the request body is not valid JSON")


@pytest.mark.parametrize(
    "part, param, words",
    [
        ({"type": "hologram"}, "messages[0].content[0].type", "'text', 'image_url'"),
        (
            {"type": "image_url", "image_url": {}},
            "messages[0].content[0].image_url.url",
            "required",
        ),
        ({"type": "text", "text": {"a": 1}}, "messages[0].content[0].text", "valid string"),
    ],
)
def test_a_bad_content_part_is_named_not_the_string_branch(client, part, param, words):
    """`content` is a string or a list of parts: the error names the part that is wrong, not
    the string the list is not."""
    messages = [{"role": "user", "content": [part]}]
    error = error_of(client.post("/v1/chat/completions", json={"messages": messages}))
    assert error["param"] == param and words in error["message"]


@pytest.mark.parametrize(
    "path, body, param",
    [
        # vLLM: "Stream options can only be defined when `stream=True`"
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"logprobs": 25}, "logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
        ("/v1/completions", {"best_of": 0}, "best_of"),
        ("/v1/completions", {"n": 0, "best_of": 2}, "n"),
        ("/v1/completions", {"prompt": ["a", ""]}, "prompt[1]"),
        ("/v1/completions", {"prompt": [[5, 6], []]}, "prompt[1]"),
        ("/v1/chat/completions", {"continue_final_message": True}, "continue_final_message"),
        ("/v1/chat/completions", {"mm_processor_kwargs": {"size": 3}}, "mm_processor_kwargs"),
        ("/v1/completions", {"truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens"),
    ],
)
def test_bad_values_name_the_request_field(client, path, body, param):
    base = {"messages": USER} if "chat" in path else {"prompt": "Hi"}
    error = error_of(client.post(path, json={**base, "max_tokens": 2, **body}))
    assert error["param"] == param
    assert param.split("[")[0] in error["message"]


@pytest.mark.parametrize(
    "path, body, param, words",
    [
        ("/v1/chat/completions", {"logit_bias": {"999999": 5}}, "logit_bias", "token ids"),
        ("/v1/completions", {"allowed_token_ids": [10**6]}, "allowed_token_ids", "token ids"),
        ("/v1/chat/completions", {"max_completion_tokens": 10**5}, "max_completion_tokens",
         "too large"),
        ("/v1/chat/completions", {"guided_regex": "("}, "guided_regex", "cannot be compiled"),
        ("/v1/chat/completions", {"structured_outputs": {"regex": "("}}, "structured_outputs",
         "structured_outputs.regex cannot be compiled"),
        ("/v1/completions", {"truncate_prompt_tokens": 10**6}, "truncate_prompt_tokens",
         "greater than max_model_len"),
    ],
)  # fmt: skip
def test_engine_errors_name_the_request_field_in_the_message(client, path, body, param, words):
    # the engine's checks say SamplingParams.<name> (what LLM users pass); the server's
    # message names the request's own field, as its param does
    base = {"messages": USER} if "chat" in path else {"prompt": "Hi"}
    error = error_of(client.post(path, json={**base, "max_tokens": 2, **body}))
    assert error["param"] == param and "SamplingParams" not in error["message"]
    assert error["message"].startswith(f"{param}") and words in error["message"]


def test_offline_engine_errors_keep_the_sampling_params_names():
    with pytest.raises(InvalidInputError, match=r"^SamplingParams\.logit_bias has token ids"):
        check_request([1, 2], SamplingParams(logit_bias={10**6: 1.0}), 64, 100)


@pytest.mark.parametrize("top_n", [0, 2])
def test_completion_top_logprobs_hold_the_chosen_token(client, top_n):
    body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 1.0, "seed": 3,
            "logprobs": top_n, "echo": True}  # fmt: skip
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    # the echoed prompt's first token has no logprob, as in vLLM
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for token, chosen, top in zip(
        lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]
    ):
        assert top[token] == pytest.approx(chosen)  # OpenAI: "up to logprobs + 1" entries
        assert top_n <= len(top) <= top_n + 1


def test_max_logprobs_bounds_what_a_request_may_ask(tmp_path_factory):
    """`LLM(max_logprobs=N)` (`--max-logprobs`): up to N top logprobs, more refused naming the
    field and the knob; the default is vLLM's 20."""
    from polymodal import LLM

    path = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    llm = LLM(path, device="cpu", dtype="float32", num_kv_blocks=32, max_logprobs=30)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, logprobs=30, prompt_logprobs=25),
                       use_tqdm=False)[0]  # fmt: skip
    assert all(len(table) >= 30 for table in out.outputs[0].logprobs)
    assert all(len(t) >= 25 for t in out.prompt_logprobs[1:])
    with pytest.raises(InvalidInputError, match=r"logprobs=31 is more .* max_logprobs=30"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, logprobs=31), use_tqdm=False)
    default = LLM(path, device="cpu", dtype="float32", num_kv_blocks=32)
    with pytest.raises(InvalidInputError, match=r"prompt_logprobs=21 is more .* max_logprobs=20"):
        default.generate([[5, 6]], SamplingParams(prompt_logprobs=21), use_tqdm=False)
