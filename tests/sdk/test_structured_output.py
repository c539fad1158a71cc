"""Structured output (xgrammar) offline: JSON schema / regex / choice outputs are valid, and a
constrained request gives the same tokens alone as in a batch with free ones (also chunked,
preempted, and with async scheduling on)."""

import json
import re

import pytest

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.llm_core.engine import Engine
from tests.helpers import tiny_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "color", "count"],
    "additionalProperties": False,
}


def satisfies(value) -> bool:
    """`value` matches SCHEMA (written out: no jsonschema dependency)."""
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "color", "count"}
        and isinstance(value["ok"], bool)
        and value["color"] in ("red", "green", "blue")
        and isinstance(value["count"], int)
        and 0 <= value["count"] <= 99
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, dtype="float32", device="cpu")


def constrained(spec, **kw):
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 400, **kw}, structured_outputs=spec)


def test_json_regex_and_choice_outputs_are_valid(llm):
    prompts = ["Give me JSON.", "Describe the sky.", "Once upon a time"]
    compact = {"json": SCHEMA, "disable_any_whitespace": True}
    for out in llm.generate(prompts, constrained(compact), use_tqdm=False):
        assert out.outputs[0].finish_reason == "stop"
        assert satisfies(json.loads(out.outputs[0].text))
    # free whitespace (the default): a random model pads every gap, up to the cap of 64
    spaced = constrained({"json": SCHEMA}, max_tokens=1500)
    out = llm.generate(prompts[0], spaced, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and satisfies(json.loads(out.text))
    regex = r"[0-9]{3}-[a-z]{2,4}"
    for out in llm.generate(prompts, constrained({"regex": regex}), use_tqdm=False):
        assert re.fullmatch(regex, out.outputs[0].text)
    choices = ["yes", "no", "maybe so"]
    for out in llm.generate(prompts, constrained({"choice": choices}), use_tqdm=False):
        assert out.outputs[0].text in choices
    obj = llm.generate(prompts[0], constrained({"json_object": True}), use_tqdm=False)[0]
    assert isinstance(json.loads(obj.outputs[0].text), dict)
    sampled = constrained(compact, n=3, seed=1)
    sampled = sampled.model_copy(update={"temperature": 1.0})
    for seq in llm.generate(prompts[0], sampled, use_tqdm=False)[0].outputs:
        assert satisfies(json.loads(seq.text))


def test_grammar_and_bad_specs(llm):
    grammar = 'root ::= "(" [a-c]+ ")"'
    out = llm.generate("x", constrained({"grammar": grammar}), use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"\([a-c]+\)", out.text)
    with pytest.raises(InvalidInputError, match=r"prompt 1: .*structured_outputs.json"):
        llm.generate(["a", "b"], [constrained({"json": SCHEMA}), constrained({"json": "{bad"})])
    with pytest.raises(InvalidInputError, match="structured_outputs.regex"):
        llm.generate("a", constrained({"regex": "("}))
    assert not llm.engine.has_unfinished()


def _run(ckpt, jobs, **engine_kw):
    engine = Engine(ckpt, dtype="float32", device="cpu", **engine_kw)
    ids = [engine.add_request(prompt, params) for prompt, params in jobs]
    final = engine.run_until_done()
    assert engine.num_free_blocks == engine.scheduler.kv.num_blocks
    return [final[i].outputs[0].token_ids for i in ids], engine


@pytest.mark.parametrize(
    "engine_kw",
    [
        {},
        {"max_num_batched_tokens": 16},
        {"num_kv_blocks": 10, "enable_prefix_caching": False},
        {"async_scheduling": True},
    ],
    ids=["batch", "chunked", "preempting", "async"],
)
def test_constrained_and_free_requests_in_one_batch_match_alone(ckpt, engine_kw):
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, seed=4, max_tokens=24, ignore_eos=True)
    jobs = []
    for i in range(8):
        prompt = [10 + i, 20 + 3 * i, 200 - i, 7, 9 + i]
        kind = i % 4
        params = [
            free,
            constrained({"json": SCHEMA}, max_tokens=60),
            seeded,
            constrained({"regex": r"[a-z]{4}-[0-9]{2}"}),
        ][kind]
        jobs.append((prompt, params))
    batched, engine = _run(ckpt, jobs, **engine_kw)
    alone = [_run(ckpt, [job])[0][0] for job in jobs]
    assert batched == alone
    if "num_kv_blocks" in engine_kw:
        assert engine.scheduler.num_preemptions > 0
    tok = engine.tokenizer
    for (_, params), ids in zip(jobs, batched):
        if params.structured_outputs is not None and params.structured_outputs.regex:
            assert re.fullmatch(r"[a-z]{4}-[0-9]{2}", tok.decode(ids, skip_special_tokens=True))


@pytest.mark.gpu
def test_mixed_batch_on_cuda_matches_alone(ckpt):
    """CUDA graphs + async scheduling: constrained rows fall back cleanly, free rows keep
    their tokens."""
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    compact = {"json": SCHEMA, "disable_any_whitespace": True}
    jobs = [([10 + i, 20 + 3 * i, 7], constrained(compact) if i % 2 else free) for i in range(6)]

    def run(batch):
        engine = Engine(ckpt, dtype="float32", device="cuda")
        ids = [engine.add_request(p, sp) for p, sp in batch]
        final = engine.run_until_done()
        return [final[i].outputs[0].token_ids for i in ids], engine.tokenizer

    batched, tok = run(jobs)
    assert batched == [run([job])[0][0] for job in jobs]
    for (_, params), ids in zip(jobs, batched):
        if params.structured_outputs is not None:
            assert satisfies(json.loads(tok.decode(ids, skip_special_tokens=True)))
