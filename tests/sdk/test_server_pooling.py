"""vLLM's pooling routes on `polymodal serve` (a real process, its engine in its own process)
against `LLM.classify / encode / reward / score` on the same tiny checkpoints: BERT
classification (3 labels), a BERT cross-encoder (1 label, segment ids), a Qwen2 process
reward model. Concurrent requests, task mismatches and bad input."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import torch

from polymodal import InvalidInputError
from polymodal.llm import LLM
from tests.helpers import tiny_checkpoint, with_pair_tokenizer
from tests.sdk.server_process import API_KEY, openai_client, post, running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.timeout(300)

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEXTS = ["the cat sat on the mat", "hello world", "a quick brown fox jumps"]
IDS = [[1, 5, 17, 42, 99, 3, 2], [1, 300, 301, 2]]
TOL = 1e-5


def serve(tmp_path_factory, ckpt):
    log_dir = tmp_path_factory.mktemp("server")
    return running_server(ckpt, log_dir, "--device", "cpu", "--dtype", "float32")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "bert_cls", id2label=LABELS)
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    with serve(tmp_path_factory, ckpt) as url:
        yield url, llm


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    ckpt = with_pair_tokenizer(tiny_checkpoint(tmp_path_factory, "bert_cls", num_labels=1))
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    with serve(tmp_path_factory, ckpt) as url:
        yield url, llm


@pytest.fixture(scope="module")
def prm(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2_prm")
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    with serve(tmp_path_factory, ckpt) as url:
        yield url, llm


def ok(resp: httpx.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def error(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=TOL)


# ---- values equal the offline API ---------------------------------------------------------
def test_classify_equals_llm_classify(classifier):
    url, llm = classifier
    inputs = [*TEXTS, *IDS]
    body = ok(post(url, "/classify", {"model": "m", "input": inputs}))
    want = llm.classify(inputs)
    assert body["object"] == "list" and body["model"] == "m" and body["id"].startswith("classify")
    assert [d["index"] for d in body["data"]] == list(range(len(inputs)))
    for got, ref in zip(body["data"], want):
        probs = ref.outputs.probs
        assert close(got["probs"], probs) and got["num_classes"] == 3
        assert got["label"] == LABELS[int(np.argmax(probs))]
    tokens = sum(len(o.prompt_token_ids) for o in want)
    assert body["usage"] == {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
    }
    one = ok(post(url, "/classify", {"input": TEXTS[0]}))  # one string, model unset
    assert close(one["data"][0]["probs"], want[0].outputs.probs)
    cut = ok(post(url, "/classify", {"input": inputs, "truncate_prompt_tokens": 3}))
    for got, ref in zip(cut["data"], llm.classify(inputs, truncate_prompt_tokens=3)):
        assert close(got["probs"], ref.outputs.probs)
    assert cut["usage"]["prompt_tokens"] == 3 * len(inputs)


def test_classify_messages(classifier):
    """vLLM's chat-form /classify: one conversation rendered by the (request's) template."""
    url, llm = classifier
    template = "{% for m in messages %}{{ m.content }} {% endfor %}"
    messages = [{"role": "user", "content": TEXTS[0]}, {"role": "user", "content": TEXTS[1]}]
    body = ok(post(url, "/classify", {"messages": messages, "chat_template": template}))
    (want,) = llm.classify([{"messages": messages, "chat_template": template,
                             "add_generation_prompt": False}])  # fmt: skip
    assert close(body["data"][0]["probs"], want.outputs.probs)
    both = error(post(url, "/classify", {"messages": messages, "input": "x"}))
    assert both["param"] == "messages"


def test_pooling_route_equals_llm_encode_and_classify(classifier):
    url, llm = classifier
    raw = ok(post(url, "/pooling", {"input": TEXTS, "task": "encode"}))
    for got, ref in zip(raw["data"], llm.encode(TEXTS)):
        assert got["object"] == "pooling" and close(got["data"], ref.outputs.data)
    probs = ok(post(url, "/pooling", {"input": IDS[0], "encoding_format": "base64"}))["data"][0]
    vector = np.frombuffer(base64.b64decode(probs["data"]), dtype="<f4")
    assert close(vector.tolist(), llm.classify([IDS[0]])[0].outputs.probs)


def test_score_and_rerank_equal_llm_score(cross_encoder):
    url, llm = cross_encoder
    query, docs = TEXTS[0], TEXTS[1:] + ["the mat sat on the cat"]
    want = [o.outputs.score for o in llm.score(query, docs)]
    for path in ("/score", "/v1/score"):
        body = ok(post(url, path, {"model": "m", "text_1": query, "text_2": docs}))
        assert [d["object"] for d in body["data"]] == ["score"] * 3
        assert close([d["score"] for d in body["data"]], want)
    pairwise = ok(post(url, "/score", {"text_1": docs, "text_2": [query] * 3}))["data"]
    want_pairwise = [o.outputs.score for o in llm.score(docs, [query] * 3)]
    assert close([d["score"] for d in pairwise], want_pairwise)
    # segment ids reach the model: the same tokens all in segment 0 score differently
    pair = llm.tokenizer(query, text_pair=docs[0])
    assert set(pair["token_type_ids"]) == {0, 1}
    flat = llm.classify([pair["input_ids"]])[0].outputs.probs[0]
    assert abs(flat - want[0]) > 1e-4
    # truncation: each pair cut by the tokenizer to 6 tokens, the longer text first
    cut = ok(post(url, "/score", {"text_1": query, "text_2": docs, "truncate_prompt_tokens": 6}))
    want_cut = llm.score(query, docs, truncate_prompt_tokens=6)
    assert close([d["score"] for d in cut["data"]], [o.outputs.score for o in want_cut])
    assert cut["usage"]["prompt_tokens"] == 6 * len(docs)
    pair = llm.tokenizer(query, text_pair=docs[0], truncation=True, max_length=6)["input_ids"]
    assert want_cut[0].prompt_token_ids == pair
    for path in ("/rerank", "/v1/rerank"):
        body = ok(post(url, path, {"query": query, "documents": docs, "top_n": 2}))
        order = sorted(range(3), key=lambda i: -want[i])[:2]
        assert [r["index"] for r in body["results"]] == order
        assert [r["document"]["text"] for r in body["results"]] == [docs[i] for i in order]
        assert close([r["relevance_score"] for r in body["results"]], [want[i] for i in order])
        assert body["usage"]["total_tokens"] > 0
    bare = ok(post(url, "/rerank", {"query": query, "documents": docs, "return_documents": False}))
    assert [sorted(r) for r in bare["results"]] == [["index", "relevance_score"]] * 3


def test_reward_pooling_equals_llm_reward(prm):
    url, llm = prm
    tag = llm.model_config.text_config.step_tag_id
    prompts = [[15, 16, 17, tag, 18, 19, tag], [11, tag, 12, 13, tag]]
    body = ok(post(url, "/pooling", {"input": prompts}))
    for got, ref in zip(body["data"], llm.reward(prompts)):
        assert close(got["data"], ref.outputs.data) and len(got["data"]) == 2  # two steps
    raw = ok(post(url, "/pooling", {"input": prompts[0], "task": "encode"}))["data"][0]["data"]
    assert close(raw, llm.encode(prompts[0])[0].outputs.data)


def test_llm_score_refuses_other_models(classifier, prm):
    for _, llm in (classifier, prm):
        with pytest.raises(InvalidInputError, match="not a cross-encoder"):
            llm.score("a", "b")


# ---- concurrency --------------------------------------------------------------------------
def test_concurrent_requests_each_get_their_own_values(classifier):
    url, llm = classifier
    inputs = [TEXTS[i % 3] + " " * (i % 2) + str(i) for i in range(24)]
    want = [o.outputs.probs for o in llm.classify(inputs)]

    async def main():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as client:
            calls = [client.post("/classify", json={"input": text}) for text in inputs]
            calls += [client.post("/pooling", json={"input": inputs, "task": "encode"})]
            return await asyncio.gather(*calls)

    *single, batch = asyncio.run(main())
    for resp, probs in zip(single, want):
        assert close(ok(resp)["data"][0]["probs"], probs)
    assert len(ok(batch)["data"]) == 24
    assert httpx.get(f"{url}/health").json()["running"] == 0


def test_engine_batches_concurrent_pooling_requests(tmp_path_factory):
    """Through the engine loop, requests submitted together run in shared steps."""
    from polymodal.async_engine import AsyncEngine
    from polymodal.llm_core.pooling import PoolingParams

    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "bert_cls")), dtype="float32", device="cpu")
    engine = AsyncEngine(llm)
    prompts = [[1, 5 + i, 17, 2] for i in range(32)]

    async def main():
        return await asyncio.gather(*(engine.generate(p, PoolingParams()) for p in prompts))

    try:
        steps = engine.stats.num_steps
        outs = asyncio.run(main())
        assert engine.stats.num_steps - steps < len(prompts) // 2
    finally:
        engine.close()
    want = llm.classify(prompts)
    assert all(close(o.outputs.data, w.outputs.probs) for o, w in zip(outs, want))


# ---- task mismatches ------------------------------------------------------------------------
def test_routes_that_do_not_fit_the_task_say_so(classifier, prm):
    url, _ = classifier
    with pytest.raises(openai.BadRequestError, match="not an embedding model.*/classify"):
        openai_client(url).embeddings.create(model="m", input="hello")
    err = error(post(url, "/score", {"text_1": "a", "text_2": "b"}))
    assert "'m'" in err["message"] and "not a cross-encoder" in err["message"]
    assert err["code"] == "model_not_supported"
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        err = error(post(url, path, body))
        assert "pooling model (task 'classify')" in err["message"] and "/classify" in err["message"]
    prm_url, _ = prm
    err = error(post(prm_url, "/classify", {"input": "x"}))
    assert "task 'reward'" in err["message"] and "/pooling" in err["message"]
    err = error(post(prm_url, "/pooling", {"input": "x", "task": "classify"}))
    assert err["param"] == "task"


# ---- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", "empty"),
        ({"input": ["ok", ""]}, "input[1]", "empty"),
        ({"input": [[1, 2], []]}, "input[1]", "empty"),
        ({"input": 5}, "input", "a string"),
        ({"input": ["a", 3]}, "input[1]", "a string or a list of token ids"),
        ({"input": [[1, 2.5]]}, "input[0]", "integers"),
        ({}, "input", "give `input`"),
        ({"input": list(range(3, 200))}, "input", "max_model_len"),
        ({"input": [[3, 4], [1, 100000]]}, "input[1]", "outside the vocab"),
        ({"input": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens", "positive"),
        ({"input": "x", "truncate_prompt_tokens": 999}, "truncate_prompt_tokens", "max_model_len"),
        ({"input": "x", "activation": "maybe"}, "activation", "bool"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(classifier, body, param, words):
    url, _ = classifier
    err = error(post(url, "/classify", body))
    assert err["param"] == param and words in err["message"], err


def test_bad_pairs_and_options_then_the_server_still_serves(cross_encoder, classifier):
    url, _ = cross_encoder
    err = error(post(url, "/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}))
    assert err["param"] == "text_1" and "3" in err["message"]
    assert error(post(url, "/score", {"text_1": "a", "text_2": [1, 2]}))["param"] == "text_2[0]"
    assert error(post(url, "/rerank", {"query": ["a"], "documents": ["b"]}))["param"] == "query"
    assert error(post(url, "/rerank", {"query": "a", "documents": []}))["param"] == "documents"
    long_doc = " ".join(["word"] * 200)
    assert (
        "max_model_len"
        in error(post(url, "/rerank", {"query": "a", "documents": [long_doc]}))["message"]
    )
    cls_url, _ = classifier
    err = error(post(cls_url, "/pooling", {"input": "x", "encoding_format": "int8"}))
    assert err["param"] == "encoding_format"
    resp = httpx.post(
        f"{cls_url}/classify", content=b"{not json", timeout=30,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert resp.status_code == 400
    assert json.loads(resp.text)["error"]["message"]
    denied = post(cls_url, "/classify", {"input": "x"}, headers={"Authorization": "Bearer no"})
    assert denied.status_code == 401
    for u in (url, cls_url):  # the engines survived all of it
        assert httpx.get(f"{u}/health").json()["status"] == "ok"
    assert ok(post(url, "/score", {"text_1": "a", "text_2": "b"}))["data"][0]["score"] > 0
