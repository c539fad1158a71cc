"""bge-m3's lexical weights and ColBERT vectors through `polymodal serve`'s `/pooling` (vLLM's
`task: "token_classify"` / `"token_embed"`), equal to `LLM.encode` on the same tiny checkpoint
(which tests/llm_core/test_bge_m3.py holds to FlagEmbedding's semantics); bad requests get a
400 naming the field."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm import LLM
from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import post, running_server

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.timeout(300)

IDS = [[0, 50, 60, 70, 2], [0, 81, 90, 81, 0, 120, 81, 2]]
TOL = 1e-5


@pytest.fixture(scope="module")
def bge_m3(tmp_path_factory):
    ckpt = tiny_checkpoint(tmp_path_factory, "xlm_roberta_embed")
    llm = LLM(str(ckpt), dtype="float32", device="cpu")
    args = ("--device", "cpu", "--dtype", "float32")
    args += ("--hf-overrides", '{"architectures": ["BgeM3EmbeddingModel"]}')
    with running_server(ckpt, tmp_path_factory.mktemp("server"), *args) as url:
        yield url, llm


@pytest.mark.parametrize("task", ["token_classify", "token_embed"])
def test_pooling_token_tasks_equal_llm(bge_m3, task):
    url, llm = bge_m3
    resp = post(url, "/pooling", {"input": IDS, "task": task})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    want = llm.encode(IDS, pooling_task=task)
    for item, out in zip(body["data"], want):
        assert (torch.tensor(item["data"]) - out.outputs.data).abs().max() <= TOL
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in IDS)


def test_dense_and_bad_requests(bge_m3):
    url, llm = bge_m3
    resp = post(url, "/v1/embeddings", {"input": [IDS[0]]})
    assert resp.status_code == 200, resp.text
    want = torch.tensor(llm.embed([IDS[0]])[0].outputs.embedding)
    assert (torch.tensor(resp.json()["data"][0]["embedding"]) - want).abs().max() <= TOL
    for body, param in (
        ({"input": IDS, "task": "sparse"}, "task"),
        ({"input": IDS, "task": "classify"}, "task"),
        ({"input": [[0, 99999, 2]], "task": "token_classify"}, "input"),
    ):
        resp = post(url, "/pooling", body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param
