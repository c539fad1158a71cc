"""Structured output with a reasoning parser (vLLM's `reasoning_parser`): the grammar holds only
after `</think>`, so a reasoning model thinks freely first; a prompt that closed its thinking
starts constrained; drafts and their masks follow the same rule; the server splits the reply
into reasoning and an answer shaped by the grammar. A tiny checkpoint gets `<think>` /
`</think>` tokens; `logit_bias` makes the model close its thinking at once."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.llm_core.structured_output import GrammarState
from tests.helpers import tiny_checkpoint

DIGITS = {"regex": "[0-9]{3}"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny Qwen2 with `<think>` and `</think>` as tokens of its own (embeddings grown)."""
    import transformers as tf

    src, dst = tiny_checkpoint(tmp_path_factory, "qwen2"), tmp_path_factory.mktemp("think")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tok = tf.AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(["<think>", "</think>"])
    model = tf.AutoModelForCausalLM.from_pretrained(dst)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return str(dst)


def _params(llm, **kw):
    end = llm.tokenizer.convert_tokens_to_ids("</think>")
    return SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=DIGITS,
                          logit_bias={end: 100.0}, **kw)  # fmt: skip


def test_grammar_waits_for_the_end_of_thinking(ckpt, tmp_path_factory):
    llm = LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=64, reasoning_parser="qwen3")
    text = llm.generate("Pick a number.", _params(llm))[0].outputs[0].text
    assert re.fullmatch(r"</think>[0-9]{3}", text), text  # thought (nothing), then the grammar
    closed = llm.tokenizer.encode("Pick a number.<think></think>")
    text = llm.generate([closed], _params(llm))[0].outputs[0].text
    assert re.fullmatch(r"[0-9]{3}", text), text  # the prompt closed it: constrained at once
    plain = LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=64)
    text = plain.generate("Pick a number.", _params(plain))[0].outputs[0].text
    assert re.fullmatch(r"[0-9]{3}", text), text  # no parser: the grammar from the first token
    bare = str(tiny_checkpoint(tmp_path_factory, "qwen2"))  # no think tokens: no waiting
    no_tags = LLM(bare, device="cpu", num_kv_blocks=32, reasoning_parser="qwen3")
    assert no_tags.engine.grammars.tags is None
    with pytest.raises(InvalidInputError, match="unknown"):
        LLM(ckpt, device="cpu", reasoning_parser="nope")


def test_waiting_state_walks_drafts(ckpt):
    llm = LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=32, reasoning_parser="qwen3")
    tok = llm.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    compiled = llm.engine.compile_grammar(SamplingParams(structured_outputs=DIGITS))
    waiting = llm.engine.grammars.after_reasoning(compiled, tok.encode("Hi"))
    one, letter = (
        tok.encode("1", add_special_tokens=False),
        tok.encode("x", add_special_tokens=False),
    )
    drafts = [letter[0], letter[0], end, one[0], letter[0]]
    state = GrammarState(waiting)
    assert state.legal_drafts(drafts) == 4  # thinking, the end, a digit; not a letter after
    words = (llm.model_config.vocab_size + 31) // 32
    masks = torch.zeros(len(drafts) + 1, words, dtype=torch.int32)
    state.draft_masks(drafts, masks)
    assert (masks[:3] == -1).all()  # still thinking up to and with the end token's row
    allowed = lambda row, t: bool((masks[row, t // 32] >> (t % 32)) & 1)  # noqa: E731
    assert allowed(3, one[0]) and not allowed(3, letter[0]) and not allowed(3, end)
    assert state.accept(letter[0]) and state.accept(end)  # the real walk: thinking, then ...
    assert state.accept(one[0]) and not state.accept(letter[0])  # ... the grammar


def test_server_splits_reasoning_from_the_constrained_answer(ckpt, tmp_path):
    pytest.importorskip("fastapi")
    import transformers as tf

    from tests.sdk.server_process import post, running_server

    end = tf.AutoTokenizer.from_pretrained(ckpt).convert_tokens_to_ids("</think>")
    body = {"model": "m", "messages": [{"role": "user", "content": "Pick."}], "max_tokens": 30,
            "temperature": 0, "structured_outputs": DIGITS}  # fmt: skip
    body["logit_bias"] = {str(end): 100}
    with running_server(ckpt, tmp_path, "--num-kv-blocks", "64", "--reasoning-parser",
                        "qwen3") as url:  # fmt: skip
        reply = post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]
        assert re.fullmatch(r"[0-9]{3}", reply["content"]) and not reply.get("reasoning_content")
