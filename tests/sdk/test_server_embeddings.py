"""An embedding model (a BERT `BertModel` checkpoint in sentence-transformers' layout: mean
pooling + Normalize; Matryoshka sizes 16 and 32) behind `polymodal serve`: `/v1/embeddings`
(float and base64, through the official openai client too; `dimensions`,
`truncate_prompt_tokens`, chat `messages`), `/pooling`, and the cosine-similarity `/score` /
`/rerank`, all equal to `LLM.embed` / `encode` / `score` on the same checkpoint."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from polymodal.llm import LLM
from polymodal.llm_core.pooling import PoolingParams
from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import openai_client, post, running_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.timeout(300)

TEXTS = ["the cat sat on the mat", "hello world", "a quick brown fox jumps"]
IDS = [1, 5, 17, 42, 99, 3, 2]
TOL = 1e-5


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "bert_st_mean", matryoshka_dimensions=[16, 32])
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    log_dir = tmp_path_factory.mktemp("server")
    with running_server(ckpt, log_dir, "--device", "cpu", "--dtype", "float32") as url:
        yield url, llm


def ok(resp) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=TOL)


def test_embeddings_equal_llm_embed(embedder):
    url, llm = embedder
    outs = llm.embed([*TEXTS, {"prompt_token_ids": IDS}])
    want = [o.outputs.embedding for o in outs]
    body = ok(post(url, "/v1/embeddings", {"model": "m", "input": [*TEXTS, IDS]}))
    assert body["object"] == "list" and body["model"] == "m"
    assert [d["object"] for d in body["data"]] == ["embedding"] * 4
    assert all(close(d["embedding"], w) for d, w in zip(body["data"], want))
    assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in outs)
    packed = ok(post(url, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"}))
    for d, w in zip(packed["data"], want):
        assert close(np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist(), w)
    raw = ok(post(url, "/v1/embeddings", {"input": TEXTS[0], "normalize": False}))
    plain = llm.embed(TEXTS[0], PoolingParams(normalize=False))[0].outputs.embedding
    assert close(raw["data"][0]["embedding"], plain) and abs(np.linalg.norm(plain) - 1) > 1e-3


def test_openai_client_float_and_base64(embedder):
    url, llm = embedder
    want = [o.outputs.embedding for o in llm.embed(TEXTS)]
    client = openai_client(url)
    for fmt in ("float", "base64"):  # the client decodes base64 itself
        resp = client.embeddings.create(model="m", input=TEXTS, encoding_format=fmt)
        got = [d.embedding for d in resp.data]
        if fmt == "base64" and isinstance(got[0], str):
            got = [np.frombuffer(base64.b64decode(g), dtype="<f4").tolist() for g in got]
        assert all(close(g, w) for g, w in zip(got, want))
    cut = client.embeddings.create(model="m", input=TEXTS, dimensions=16)
    want = [o.outputs.embedding for o in llm.embed(TEXTS, PoolingParams(dimensions=16))]
    assert all(close(d.embedding, w) for d, w in zip(cut.data, want))
    assert all(len(d.embedding) == 16 for d in cut.data)
    with pytest.raises(openai.BadRequestError, match=r"dimensions.*\[16, 32\]"):
        client.embeddings.create(model="m", input="x", dimensions=8)


def test_truncate_prompt_tokens_and_chat_messages(embedder):
    url, llm = embedder
    want = llm.embed([*TEXTS, IDS], truncate_prompt_tokens=4)
    body = ok(post(url, "/v1/embeddings", {"input": [*TEXTS, IDS], "truncate_prompt_tokens": 4}))
    assert all(close(d["embedding"], o.outputs.embedding) for d, o in zip(body["data"], want))
    assert body["usage"]["prompt_tokens"] == 4 * len(want)
    pooled = ok(post(url, "/pooling", {"input": TEXTS, "truncate_prompt_tokens": -1}))
    assert all(
        close(d["data"], o.outputs.embedding) for d, o in zip(pooled["data"], llm.embed(TEXTS))
    )
    for keep, words in ((129, "greater than max_model_len (128)"), (0, "positive")):
        err = post(url, "/v1/embeddings", {"input": "x", "truncate_prompt_tokens": keep})
        assert err.status_code == 400 and err.json()["error"]["param"] == "truncate_prompt_tokens"
        assert words in err.json()["error"]["message"]
    # one conversation, rendered by the chat template (no assistant turn opened)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    want = llm.embed([llm.tokenizer.encode(text, add_special_tokens=False)])[0].outputs.embedding
    assert llm.embed([messages])[0].outputs.embedding == want
    for route, key in (("/v1/embeddings", "embedding"), ("/pooling", "data")):
        body = ok(post(url, route, {"messages": messages}))
        assert len(body["data"]) == 1 and close(body["data"][0][key], want)
    opened = ok(post(url, "/v1/embeddings", {"messages": messages, "add_generation_prompt": True}))
    assert not close(opened["data"][0]["embedding"], want)
    bad = [({"input": "x"}, "messages"), ({"add_special_tokens": True}, "add_special_tokens")]
    for extra, param in [*bad, ({"messages": []}, "messages")]:
        err = post(url, "/v1/embeddings", {"messages": messages, **extra})
        assert err.status_code == 400 and err.json()["error"]["param"] == param


def test_pooling_equals_llm_embed_and_encode(embedder):
    url, llm = embedder
    body = ok(post(url, "/pooling", {"input": TEXTS}))
    assert all(
        close(d["data"], o.outputs.embedding) for d, o in zip(body["data"], llm.embed(TEXTS))
    )
    raw = ok(post(url, "/pooling", {"input": TEXTS, "task": "encode"}))
    assert all(close(d["data"], o.outputs.data) for d, o in zip(raw["data"], llm.encode(TEXTS)))


def test_score_and_rerank_are_cosine_similarities(embedder):
    url, llm = embedder
    query, docs = TEXTS[0], TEXTS[1:] + ["the mat sat on the cat"]
    want = [o.outputs.score for o in llm.score(query, docs)]
    for path in ("/score", "/v1/score"):
        body = ok(post(url, path, {"text_1": query, "text_2": docs}))
        assert close([d["score"] for d in body["data"]], want)
        tokens = sum(len(o.prompt_token_ids) for o in llm.score(query, docs))
        assert body["usage"]["prompt_tokens"] == tokens
    pairwise = ok(post(url, "/score", {"text_1": docs, "text_2": docs[::-1]}))["data"]
    assert close(
        [d["score"] for d in pairwise], [o.outputs.score for o in llm.score(docs, docs[::-1])]
    )
    body = ok(post(url, "/rerank", {"query": query, "documents": docs, "top_n": 2}))
    order = sorted(range(3), key=lambda i: -want[i])[:2]
    assert [r["index"] for r in body["results"]] == order
    assert close([r["relevance_score"] for r in body["results"]], [want[i] for i in order])


def test_routes_and_bad_input_name_the_embedding_model(embedder):
    url, _ = embedder
    err = post(url, "/classify", {"input": "x"}).json()["error"]
    assert "task 'embed'" in err["message"]
    for route in ("/v1/embeddings", "/pooling", "/score", "/rerank"):
        assert route in err["message"]
    err = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert "pooling model (task 'embed')" in err.json()["error"]["message"]
    err = post(url, "/score", {"text_1": "a", "text_2": ["b", " ".join(["word"] * 200)]})
    assert err.status_code == 400 and err.json()["error"]["param"] == "text_2[1]"
    err = post(url, "/v1/embeddings", {"input": ["ok", ""]})
    assert err.status_code == 400 and err.json()["error"]["param"] == "input[1]"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
