"""`polymodal serve --speculative-config` (n-gram drafts, a draft model): completions, whole
and streamed, equal `LLM.generate` without drafts; `/metrics` counts the drafts checked and
accepted."""

from __future__ import annotations

import json

import pytest

from tests.sdk.server_process import API_KEY, tiny_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.timeout(300)

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
PROMPTS = ["one two three four one two three four one two", "red blue red blue red blue red"]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory, "--speculative-config", json.dumps(NGRAM),
                     "--num-kv-blocks", "256") as url:  # fmt: skip
        yield url


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _streamed(url: str, body: dict) -> list[int]:
    ids = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      headers=HEADERS, timeout=120) as r:  # fmt: skip
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0]["token_ids"]
    return ids


def test_completions_equal_decoding_without_drafts(server, tmp_path_factory):
    from polymodal import LLM, SamplingParams
    from tests.helpers import tiny_checkpoint

    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2_vl")), device="cpu", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for prompt in PROMPTS:
        want = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        body = {"model": "m", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        got = httpx.post(f"{server}/v1/completions", json=body, headers=HEADERS, timeout=120)
        choice = got.json()["choices"][0]
        assert choice["token_ids"] == want.token_ids
        assert choice["text"] == want.text
        assert _streamed(server, body) == want.token_ids
    drafts = _metric(server, "polymodal:spec_decode_num_draft_tokens_total")
    accepted = _metric(server, "polymodal:spec_decode_num_accepted_tokens_total")
    assert drafts > accepted > 0
    assert _metric(server, "polymodal:spec_decode_num_drafts_total") > 0


def test_a_draft_model_through_the_server(tmp_path_factory):
    """`--speculative-config` with a draft model (the target itself, so its drafts are
    accepted): streamed and whole completions equal `LLM.generate` without drafts."""
    from polymodal import LLM, SamplingParams
    from tests.helpers import tiny_checkpoint

    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    draft = {"method": "draft_model", "model": ckpt, "num_speculative_tokens": 3}
    llm = LLM(ckpt, device="cpu", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    want = [llm.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    with tiny_server(tmp_path_factory, "--speculative-config", json.dumps(draft),
                     "--num-kv-blocks", "128", arch="qwen2") as url:  # fmt: skip
        for prompt, ids in zip(PROMPTS, want):
            body = {"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}  # fmt: skip
            got = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=120)
            assert got.json()["choices"][0]["token_ids"] == ids
            assert _streamed(url, body) == ids
        drafts = _metric(url, "polymodal:spec_decode_num_draft_tokens_total")
        assert _metric(url, "polymodal:spec_decode_num_accepted_tokens_total") >= 0.9 * drafts > 0
