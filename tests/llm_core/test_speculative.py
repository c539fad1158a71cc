"""N-gram speculative decoding (`speculative_config`) in the engine: greedy outputs equal
decoding without drafts (batches, chunk budgets, preemption, prefix hits, stops, penalties,
logprobs, sliding windows, images, grammars, LoRA, tensor parallelism, beam search); seeded
sampling stays batch-independent. The engine-free parts: test_speculative_parts.py."""

import json
import random
import re

import numpy as np
import pytest

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import run_preempted, tiny_checkpoint

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4}  # fmt: skip
rng = random.Random(0)
PROMPTS = []
for n in range(4, 40, 5):  # prompts that repeat themselves: drafts find matches
    base = [rng.randrange(10, 470) for _ in range(n)]
    PROMPTS.append(base + base[: n // 2] + base)
GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


def _engine(ckpt, spec=True, **kw):
    kw.setdefault("num_kv_blocks", 256)
    if spec:
        kw["speculative_config"] = NGRAM
    return Engine(ckpt, dtype="float32", device="cpu", **kw)


def _run(engine, prompts=PROMPTS, params=GREEDY):
    ids = [engine.add_request(p, params) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0] for i in ids]


def _ids(outs):
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def plain(ckpt):
    return _ids(_run(_engine(ckpt, spec=False)))


def _accepts(engine) -> None:
    """The test drafted and kept some drafts (else it checked nothing)."""
    spec = engine.speculation
    assert spec.num_draft_tokens > spec.num_accepted_tokens > 0


def test_greedy_equals_decoding_without_drafts(ckpt, plain):
    engine = _engine(ckpt)
    assert _ids(_run(engine)) == plain
    _accepts(engine)
    assert engine.num_free_blocks == 256


def test_large_batches_keep_async_scheduling(ckpt, plain):
    """`disable_by_batch_size`: while more requests than that are queued or running, steps
    draft nothing and overlap (async scheduling); once fewer remain, they draft again."""
    config = {**NGRAM, "disable_by_batch_size": 3}
    engine = _engine(ckpt, False, async_scheduling=True, speculative_config=config)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]  # fmt: skip
    ids = [engine.add_request(p, q) for p, q in zip(PROMPTS, params)]
    overlapped = drafting = 0
    final = {}
    while engine.has_unfinished():
        drafts = engine.speculation.num_draft_tokens
        final.update((o.request_id, o) for o in engine.step() if o.finished)
        overlapped += engine._in_flight is not None
        drafting += engine.speculation.num_draft_tokens > drafts
    assert overlapped > 0 and drafting > 0
    want = [ref[: q.max_tokens] for ref, q in zip(plain, params)]
    assert [final[i].outputs[0].token_ids for i in ids] == want
    assert engine.num_free_blocks == 256


def test_chunk_budget_cuts_drafts_preemption_and_prefix_hits(ckpt, plain):
    small = _engine(ckpt, max_num_batched_tokens=6)
    assert _ids(_run(small)) == plain
    _accepts(small)
    tiny = _engine(ckpt, num_kv_blocks=14, enable_prefix_caching=False)
    assert run_preempted(tiny, PROMPTS, GREEDY) == plain
    assert tiny.num_free_blocks == 14
    cached = _engine(ckpt)
    first = _ids(_run(cached))
    hits = cached.scheduler.kv.num_hit_tokens
    assert _ids(_run(cached)) == first == plain
    assert cached.scheduler.kv.num_hit_tokens > hits


def test_stops_inside_an_accepted_run(ckpt, plain):
    """max_tokens and stop token ids that fall among accepted drafts end the output there."""
    for max_tokens in (1, 2, 5, 7):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        assert _ids(_run(_engine(ckpt), params=params)) == [p[:max_tokens] for p in plain]
    stop = plain[0][9]
    params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop], ignore_eos=True)
    outs = _run(_engine(ckpt), params=params)
    for out, ref in zip(outs, plain):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert out.token_ids == ref[:cut]
        assert out.finish_reason == ("stop" if stop in ref else "length")


def test_logprobs_and_logit_rules_follow_the_drafts(ckpt, plain):
    """Penalties, min_tokens and logprobs of each row see the drafts before it (penalties
    mild enough that the outputs still repeat, so drafts get accepted)."""
    params = SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3, repetition_penalty=1.03,
        frequency_penalty=0.01, min_tokens=5, logit_bias={17: 0.5},
    )  # fmt: skip
    engine = _engine(ckpt)
    spec, ref = _run(engine, params=params), _run(_engine(ckpt, spec=False), params=params)
    assert _ids(spec) == _ids(ref) != plain  # the penalties change the outputs
    _accepts(engine)
    for a, b in zip(spec, ref):
        for table_a, table_b in zip(a.logprobs, b.logprobs):
            assert table_a.keys() == table_b.keys()
            assert all(abs(table_a[t] - table_b[t]) < 1e-4 for t in table_a)
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-3)


def test_streamed_deltas_add_up(ckpt, plain):
    """A step that books several tokens reports all of them in its output's deltas."""
    engine = _engine(ckpt)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    seen = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id] += out.outputs[0].delta_token_ids
    assert [seen[i] for i in ids] == plain
    assert max(len(o) for o in plain) == 30


@pytest.mark.parametrize("arch", ["gemma3", "qwen2_vl", "mllama", "llama4", "deepseek_v3"])
def test_other_families(tmp_path_factory, arch):
    """Gemma 3's sliding-window KV groups (blocks freed as windows slide), Qwen2-VL's M-RoPE
    positions after the prompt, Mllama's cross-attention groups, Llama 4's chunked local
    attention, DeepSeek-V3's latent (MLA) cache."""
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    prompts = [p[:30] for p in PROMPTS]
    plain = _ids(_run(_engine(path, spec=False, block_size=4), prompts))
    engine = _engine(path, block_size=4)
    assert _ids(_run(engine, prompts)) == plain
    _accepts(engine)


def test_interpreted_triton_kernels(tmp_path_factory):
    """The Triton attention kernels (interpreted on CPU) check drafts as a chunk over the
    cached context, with Gemma 3's window groups."""
    pytest.importorskip("triton")
    from tests.llm_core import interpreted

    if not interpreted.IN_PROCESS:
        pytest.skip("the Triton kernels are compiled in this process (GPU tests cover them)")
    path = str(tiny_checkpoint(tmp_path_factory, "gemma3"))
    prompts, params = [PROMPTS[1], PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=12)
    kw = {"attention_backend": "triton", "block_size": 4}
    engine = _engine(path, **kw)
    assert _ids(_run(engine, prompts, params)) == _ids(_run(_engine(path, False, **kw), prompts,
                                                            params))  # fmt: skip
    _accepts(engine)


def test_image_prompt(tmp_path_factory):
    from PIL import Image

    from polymodal import LLM

    path = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (56, 84, 3), np.uint8))
    text = "<|vision_start|><|image_pad|><|vision_end|>" + "a b c d a b c d a b c d"
    prompt = {"prompt": text, "multi_modal_data": {"image": image}}
    outs = []
    for spec in ({}, {"speculative_config": NGRAM}):
        llm = LLM(path, dtype="float32", device="cpu", num_kv_blocks=128, **spec)
        outs.append(llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids)
    assert outs[0] == outs[1]


def test_seeded_sampling_is_batch_independent(ckpt):
    params = [SamplingParams(temperature=0.8, top_k=20, seed=7 + i, max_tokens=20)
              for i in range(3)]  # fmt: skip
    alone = [_ids(_run(_engine(ckpt), [PROMPTS[i]], params[i]))[0] for i in range(3)]
    engine = _engine(ckpt)
    ids = [engine.add_request(PROMPTS[i], params[i]) for i in (2, 0, 1)]
    final = engine.run_until_done()
    mixed = dict(zip((2, 0, 1), (final[i].outputs[0].token_ids for i in ids)))
    assert [mixed[i] for i in range(3)] == alone


def test_the_context_array_follows_the_outputs(ckpt):
    engine = _engine(ckpt)
    rid = engine.add_request(list(range(10, 300)), GREEDY)
    seq = engine._groups[rid].seqs[0]
    while engine.has_unfinished():
        engine.step()
        if seq.draft_context is not None:
            buf, known = seq.draft_context
            assert buf[:known].tolist() == seq.all_token_ids[:known]
    assert known > 300  # extended by the outputs, step after step


def test_pooling_models_refuse_it(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "bert_cls"))
    with pytest.raises(InvalidInputError, match="generates no tokens"):
        Engine(path, device="cpu", speculative_config=NGRAM)


def test_n_sequences_and_prompt_logprobs(ckpt, plain):
    """Each of a request's n sequences drafts from its own tokens; prompt logprobs are the
    prompt's, as without drafts."""
    params = SamplingParams(temperature=0.0, max_tokens=30, n=2, ignore_eos=True,
                            prompt_logprobs=2)  # fmt: skip
    outs = {}
    for spec in (True, False):
        engine = _engine(ckpt, spec=spec)
        rid = engine.add_request(PROMPTS[2], params)
        outs[spec] = engine.run_until_done()[rid]
    assert [o.token_ids for o in outs[True].outputs] == [plain[2]] * 2
    assert outs[True].prompt_logprobs == outs[False].prompt_logprobs


def test_lora_adapters(tmp_path_factory):
    pytest.importorskip("peft")
    from polymodal.llm_core.lora.adapter import LoRARequest
    from tests.llm_core.lora_adapters import make_adapters

    base = tiny_checkpoint(tmp_path_factory, "llama")
    adapters = make_adapters(base, tmp_path_factory.mktemp("lora_spec"))
    lora = LoRARequest("all", 1, str(adapters["all"][0]))
    outs = []
    for spec in (True, False):
        engine = _engine(str(base), spec=spec, enable_lora=True, max_loras=2, num_kv_blocks=64)
        ids = [engine.add_request(p, GREEDY, lora_request=lora if i % 2 else None)
               for i, p in enumerate(PROMPTS[:4])]  # fmt: skip
        final = engine.run_until_done()
        outs.append([final[i].outputs[0].token_ids for i in ids])
    assert outs[0] == outs[1]


@pytest.mark.timeout(300)
def test_tensor_parallel_ranks(ckpt, plain):
    engine = _engine(ckpt, tensor_parallel_size=2)
    try:
        assert _ids(_run(engine, PROMPTS[:3])) == plain[:3]
        _accepts(engine)
    finally:
        engine.close()


def test_beam_search_on_a_drafting_engine(ckpt):
    """Beam search (one token a step per beam) gives the same beams with drafts on."""
    from polymodal import LLM
    from polymodal.beam_search import BeamSearchParams

    params = BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    beams = []
    for spec in ({"speculative_config": NGRAM}, {}):
        llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=128, **spec)
        outs = llm.beam_search(prompts, params)
        beams.append([[s.tokens for s in o.sequences] for o in outs])
    assert beams[0] == beams[1]


@pytest.mark.parametrize(
    "spec",
    [{"regex": "[a-z ]{1,80}"}, {"regex": "[0-9]{1,60}"}, {"json": {"type": "array"}}],
)
def test_structured_output_drafts_only_what_the_grammar_allows(ckpt, spec):
    """Drafts are cut to what the grammar allows; each row is masked by the state after the
    drafts before it: the outputs equal those without drafts, and they still match."""
    from polymodal.llm_core.sampling_params import StructuredOutputsParams

    params = SamplingParams(temperature=0.0, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(**spec))  # fmt: skip
    prompts = [list(range(10, 20)) * 3, PROMPTS[4], PROMPTS[1]]
    outs = []
    for drafting in (True, False):
        engine = _engine(ckpt, spec=drafting)
        outs.append([(o.token_ids, o.text, o.finish_reason) for o in _run(engine, prompts, params)])
        if drafting and "regex" in spec:
            _accepts(engine)
    assert outs[0] == outs[1]
    for _, text, reason in outs[0]:
        if "regex" in spec:
            assert re.fullmatch(spec["regex"], text), text
        elif reason == "stop":  # complete (else cut by max_tokens)
            assert isinstance(json.loads(text), list)
