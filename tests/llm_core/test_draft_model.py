"""Speculative decoding with a draft model (`speculative_config={"method": "draft_model",
"model": DIR}`): greedy outputs equal decoding without drafts whatever the draft proposes
(batches, chunk budgets that split the draft's catch-up, preemption, prefix hits, n
sequences, stops, grammars); the target as its own draft has its greedy drafts accepted; the
draft's pages share the target's block ids and count in the KV budget; what the draft path
does not do is refused naming it."""

import pytest

from polymodal.demo_model import write_demo_checkpoint
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError, ModelNotFoundError
from polymodal.llm_core.sampling_params import SamplingParams, StructuredOutputsParams
from tests.helpers import run_preempted, tiny_checkpoint

PROMPTS = [[(7 * i + 3 * j) % 400 + 10 for j in range(n)] for i, n in enumerate(range(3, 60, 7))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    """Another model of the same tokenizer: one layer, other weights (its drafts are mostly
    wrong, which the check must survive)."""
    out = tmp_path_factory.mktemp("draft")
    return str(
        write_demo_checkpoint(
            out, "qwen2", seed=1, num_hidden_layers=1, layer_types=["full_attention"]
        )
    )


def _config(draft, k=3):
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": k}


def _engine(ckpt, draft=None, k=3, **kw):
    kw.setdefault("num_kv_blocks", 256)
    if draft is not None:
        kw["speculative_config"] = _config(draft, k)
    return Engine(ckpt, dtype="float32", device="cpu", **kw)


def _run(engine, prompts=PROMPTS, params=GREEDY):
    ids = [engine.add_request(p, params) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def plain(ckpt):
    return _run(_engine(ckpt))


@pytest.mark.parametrize("k, graph_batch", [(1, 512), (4, 512), (4, 0)])
def test_the_target_as_its_own_draft_is_accepted(ckpt, plain, k, graph_batch):
    """Drafts of the target's own weights are its greedy tokens. The draft's one-token steps
    run through its decode-graph buffers (padded, eager on the CPU) or, with
    `max_graph_batch=0`, plainly; requests near `max_tokens` draft fewer than k."""
    engine = _engine(ckpt, ckpt, k, max_graph_batch=graph_batch)
    assert (engine.runner.draft.graphs is None) == (graph_batch == 0)
    assert _run(engine) == plain
    spec = engine.speculation
    assert spec.num_draft_tokens > 0
    # the same weights propose the target's own greedy tokens (fp32: a rare near-tie may differ)
    assert spec.num_accepted_tokens >= 0.95 * spec.num_draft_tokens
    assert engine.num_free_blocks == 256
    mixed = [SamplingParams(temperature=0.0, max_tokens=3 + 2 * i, ignore_eos=True)
             for i in range(len(PROMPTS))]  # fmt: skip
    want = []
    for prompt, params in zip(PROMPTS, mixed):
        want += _run(_engine(ckpt), [prompt], params)
    ids = [engine.add_request(p, q) for p, q in zip(PROMPTS, mixed)]
    final = engine.run_until_done()
    assert [final[i].outputs[0].token_ids for i in ids] == want


def test_another_draft_keeps_the_target_outputs(ckpt, other_draft, plain):
    engine = _engine(ckpt, other_draft, 4)
    assert _run(engine) == plain
    assert engine.speculation.num_draft_tokens > 0
    assert engine.num_free_blocks == 256


def test_catch_up_split_by_the_budget_preemption_and_prefix_hits(ckpt, plain):
    """A step budget smaller than the prompts splits the draft's catch-up over steps; a small
    pool preempts (the draft starts over on the new blocks); repeated prompts hit the prefix
    cache (blocks the other request's draft wrote)."""
    engine = _engine(ckpt, ckpt, 3, max_num_batched_tokens=16)
    assert _run(engine) == plain
    assert engine.speculation.num_accepted_tokens > 0
    engine = _engine(ckpt, ckpt, 3)
    assert _run(engine) == plain
    assert _run(engine) == plain  # the prompts again: their blocks come from the prefix cache
    assert engine.scheduler.kv.num_hit_tokens > 0
    assert engine.speculation.num_accepted_tokens >= 0.95 * engine.speculation.num_draft_tokens
    small = _engine(ckpt, ckpt, 3, num_kv_blocks=12, max_num_seqs=4)
    assert run_preempted(small, PROMPTS[4:8], GREEDY) == plain[4:8]
    assert small.num_free_blocks == 12


def test_n_sequences_stops_and_sampled_rows(ckpt, plain):
    engine = _engine(ckpt, ckpt, 3)
    stop_at = plain[2][5]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                            stop_token_ids=[stop_at])  # fmt: skip
    [out] = _run(engine, [PROMPTS[2]], params)
    assert out == plain[2][: plain[2].index(stop_at) + 1]
    two = SamplingParams(n=2, temperature=0.0, max_tokens=24, ignore_eos=True)
    rid = engine.add_request(PROMPTS[1], two)
    final = engine.run_until_done()[rid]
    assert [o.token_ids for o in final.outputs] == [plain[1], plain[1]]
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
    [a] = _run(engine, [PROMPTS[3]], seeded)
    assert len(a) == 12 and engine.speculation.num_draft_tokens > 0


def test_structured_output_drafts_only_what_the_grammar_allows(ckpt):
    choice = StructuredOutputsParams(choice=["yes", "no", "maybe"])
    params = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=choice)
    outs = []
    for draft in (None, ckpt):
        engine = _engine(ckpt, draft)
        rid = engine.add_request(PROMPTS[4], params)
        outs.append(engine.run_until_done()[rid].outputs[0].text)
    assert outs[0] == outs[1] and outs[0] in ("yes", "no", "maybe")


def test_draft_pages_count_in_the_kv_budget(ckpt, other_draft):
    """Without `num_kv_blocks`, the CPU budget holds both models' pages per block id."""
    alone = _engine(ckpt, num_kv_blocks=None, cpu_kv_cache_gb=0.01)
    both = _engine(ckpt, other_draft, num_kv_blocks=None, cpu_kv_cache_gb=0.01)
    draft = both.runner.draft
    target_bytes = alone.runner.kv_caches[0].nbytes * len(alone.runner.kv_caches)
    per_block = target_bytes // alone.scheduler.kv.num_blocks + draft.block_bytes
    assert both.scheduler.kv.num_blocks == int(0.01 * (1 << 30)) // per_block
    assert draft.kv_caches[0].shape[1] == both.scheduler.kv.num_blocks


def test_ids_past_the_draft_vocab_get_no_drafts(ckpt, tmp_path):
    """A context id the draft cannot embed: that sequence drafts nothing, others still do."""
    small = write_demo_checkpoint(tmp_path / "small", "qwen2", seed=2, vocab_size=300)
    engine = _engine(ckpt, str(small), 3)
    prompts = [[350, 20, 30, 40], [20, 30, 40, 50]]
    plain = _run(_engine(ckpt), prompts)
    assert _run(engine, prompts) == plain


@pytest.mark.parametrize(
    "target, draft, words",
    [
        ("qwen2", "missing", "is not a local directory"),
        ("gemma3", "qwen2", r"Gemma3ForCausalLM's KV cache has \['full', 'sliding'\] layers"),
        ("qwen2", "gemma3", r"has \['full', 'sliding'\] KV layers"),
        ("qwen2", "qwen2_vl", "is not a text generation model"),
    ],
)
def test_what_the_draft_path_does_not_do_is_refused(tmp_path_factory, tmp_path, target, draft,
                                                    words):  # fmt: skip
    ckpt = str(tiny_checkpoint(tmp_path_factory, target))
    path = (
        str(tmp_path / "nothing")
        if draft == "missing"
        else str(tiny_checkpoint(tmp_path_factory, draft))
    )
    error = ModelNotFoundError if draft == "missing" else InvalidInputError
    with pytest.raises(error, match=words):
        _engine(ckpt, path)


def test_tensor_parallel_is_refused(ckpt):
    with pytest.raises(InvalidInputError, match="tensor_parallel_size > 1 is not supported"):
        _engine(ckpt, ckpt, tensor_parallel_size=2)
