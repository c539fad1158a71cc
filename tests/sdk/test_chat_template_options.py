"""Chat template options vLLM's chat requests carry: `documents` (a RAG template's variable),
`add_special_tokens` (the tokenizer's BOS on the rendered text; off by default: the template
writes its own), `reasoning_effort` (a template variable): offline through a messages prompt
dict for a text and a VL model, and through the server's `/v1/chat/completions` (and the
Responses API's `reasoning.effort`)."""

from __future__ import annotations

import shutil

import pytest

from polymodal import LLM, SamplingParams
from tests.helpers import tiny_checkpoint

TEMPLATE = (
    "{% for d in documents or [] %}[doc {{ d.title }}: {{ d.text }}]{% endfor %}"
    "{% if reasoning_effort is defined %}(effort {{ reasoning_effort }}){% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content if m.content is string else "
    "m.content | map(attribute='text') | select | join('') }}\n{% endfor %}"
)
BOS = "<|endoftext|>"


def _with_bos(src, dst):
    """A copy of the checkpoint whose tokenizer puts a BOS before every encoded text."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    bos = [(BOS, tok.convert_tokens_to_ids(BOS))]
    post = TemplateProcessing(single=f"{BOS} $A", special_tokens=bos)
    tok.backend_tokenizer.post_processor = post
    tok.save_pretrained(dst)
    return dst


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_vl"])
def test_offline_options(tmp_path_factory, tmp_path, arch):
    path = _with_bos(tiny_checkpoint(tmp_path_factory, arch), tmp_path / "bos")
    llm = LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=32)
    tok, bos = llm.tokenizer, llm.tokenizer.convert_tokens_to_ids(BOS)
    messages = [{"role": "user", "content": "hello"}]
    docs = [{"title": "T", "text": "a fact"}]
    prompt = {"messages": messages, "chat_template": TEMPLATE, "documents": docs,
              "chat_template_kwargs": {"reasoning_effort": "low"}}  # fmt: skip
    ids = llm.process(prompt).token_ids
    assert tok.decode(ids) == "[doc T: a fact](effort low)user: hello\n"
    assert ids[0] != bos  # the template's text as is
    with_bos = llm.process({**prompt, "add_special_tokens": True}).token_ids
    assert with_bos == [bos, *ids]
    out = llm.generate({**prompt, "add_special_tokens": True}, SamplingParams(max_tokens=3))
    assert out[0].prompt_token_ids == with_bos


def test_server_chat_options(tmp_path_factory, tmp_path):
    pytest.importorskip("fastapi")
    from tests.sdk.server_process import post, running_server

    path = _with_bos(tiny_checkpoint(tmp_path_factory, "qwen2"), tmp_path / "bos")
    with running_server(path, tmp_path, "--num-kv-blocks", "32", "--chat-template",
                        TEMPLATE) as url:  # fmt: skip
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                "chat_template": TEMPLATE, "return_token_ids": True}  # fmt: skip

        def prompt_ids(**extra):
            resp = post(url, "/v1/chat/completions", {**body, **extra})
            assert resp.status_code == 200, resp.text
            return resp.json()["prompt_token_ids"]

        plain = prompt_ids()
        rich = prompt_ids(documents=[{"title": "T", "text": "x"}], reasoning_effort="high",
                          add_special_tokens=True)  # fmt: skip
        text = post(url, "/detokenize", {"tokens": rich}).json()["prompt"]
        assert text == BOS + "[doc T: x](effort high)user: hi\n"
        assert post(url, "/detokenize", {"tokens": plain}).json()["prompt"] == "user: hi\n"
        bad = post(url, "/v1/chat/completions", {**body, "reasoning_effort": "max"})
        assert bad.status_code == 400 and "reasoning_effort" in bad.json()["error"]["param"]
        # the Responses API's reasoning.effort: the same template variable
        ask = {"model": "m", "input": "hi", "max_output_tokens": 2}
        plain = post(url, "/v1/responses", ask).json()["usage"]["input_tokens"]
        high = post(url, "/v1/responses", {**ask, "reasoning": {"effort": "high"}}).json()
        assert plain == len(prompt_ids())  # the chat route's prompt for the same message
        assert high["usage"]["input_tokens"] == len(prompt_ids(reasoning_effort="high")) > plain
        summary = post(url, "/v1/responses", {**ask, "reasoning": {"summary": "auto"}})
        assert summary.status_code == 400 and summary.json()["error"]["param"] == "reasoning"
