"""Gemma 3 (text) against transformers on tiny random checkpoints: local/global layer patterns
with windows shorter than the prompt, two rotary bases, scaled embeddings, sandwich norms,
soft-capped logits; and the engine's invariances with its two KV groups."""

import pytest

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import assert_matches_transformers, run_preempted, tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],  # 17 > window 8
    [7, 8, 9],
    [300 + i for i in range(40)],
]

PATTERNS = {
    "5_local_1_global": {},
    "global_first": {
        "num_hidden_layers": 4,
        "layer_types": [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
    },
    "all_local_window_3": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention"] * 3,
        "sliding_window": 3,
        "final_logit_softcapping": None,
    },
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_matches_transformers(tmp_path_factory, pattern):
    path = tiny_checkpoint(tmp_path_factory, "gemma3", **PATTERNS[pattern])
    assert_matches_transformers(path, PROMPTS, steps=10)


def test_chunked_prefill_in_the_interpreted_triton_kernels(tmp_path_factory):
    """The Triton attention kernels (interpreted on CPU) with both KV groups and a prompt split
    across steps: still transformers' tokens and logits."""
    pytest.importorskip("triton")
    from tests.llm_core import interpreted

    if not interpreted.IN_PROCESS:
        pytest.skip("the Triton kernels are compiled in this process (GPU tests cover them)")
    path = tiny_checkpoint(tmp_path_factory, "gemma3")
    engine = assert_matches_transformers(
        path, PROMPTS[:2], steps=6, logit_steps=6, attention_backend="triton",
        max_num_batched_tokens=12,
    )  # fmt: skip
    assert len(engine.scheduler.kv.specs) == 6  # 5 sliding groups + 1 global, one layer each


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "gemma3"))


def _run(engine, prompts):
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


def _engine(ckpt, **kw):
    return Engine(ckpt, dtype="float32", device="cpu", **{"num_kv_blocks": 128, **kw})


@pytest.fixture(scope="module")
def alone(ckpt):
    engine = _engine(ckpt, enable_prefix_caching=False)
    return [_run(engine, [p])[0] for p in PROMPTS]


def test_invariant_to_batch_chunking_preemption_and_prefix_hits(ckpt, alone):
    assert _run(_engine(ckpt), PROMPTS) == alone  # one batch
    assert _run(_engine(ckpt, max_num_batched_tokens=7), PROMPTS) == alone  # chunks < window
    # 4-token blocks, 8-token steps: a request holds <= 13 global + 5 x 5 local blocks
    tiny = _engine(
        ckpt, num_kv_blocks=40, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False
    )
    assert run_preempted(tiny, PROMPTS, GREEDY) == alone
    assert tiny.num_free_blocks == 39  # all but the null block
    cached = _engine(ckpt)
    first = _run(cached, PROMPTS)
    hits = cached.scheduler.kv.num_hit_tokens
    assert _run(cached, PROMPTS) == first == alone
    assert cached.scheduler.kv.num_hit_tokens > hits


def test_window_layers_hold_only_their_window(ckpt):
    """A long request: the local groups' tables keep blocks for the last `window` keys only."""
    engine = _engine(ckpt, block_size=4, max_num_batched_tokens=16)
    kv = engine.scheduler.kv
    rid = engine.add_request(list(range(5, 105)), SamplingParams(max_tokens=20, ignore_eos=True))
    seq = engine._groups[rid].seqs[0]
    while engine.has_unfinished():
        engine.step()
        if seq.block_tables:
            held = kv.num_held_blocks(seq)
            assert all(h <= (8 + 16) // 4 + 1 for h in held[:5]), held  # window 8 + the step
            if seq.num_computed_tokens > 100:  # decoding: the window and one new token
                assert all(h <= 8 // 4 + 1 for h in held[:5]), held
            assert held[5] == len(seq.block_tables[5])  # the global layer keeps everything
    assert engine.num_free_blocks == kv.num_usable_blocks


def test_no_leaked_blocks_after_300_random_requests(ckpt):
    """Finishing, aborted and preempted requests across Gemma 3's six KV groups (prefix hits
    included), through the whole engine: every block comes back, every ref count is 0 (1000
    requests on the scheduler alone: test_kv_groups.py)."""
    import random

    engine = _engine(
        ckpt,
        num_kv_blocks=70,
        block_size=4,
        max_num_batched_tokens=32,
        max_num_seqs=24,
        skip_tokenizer_init=True,
    )
    kv, rng = engine.scheduler.kv, random.Random(2)
    start, live, submitted = engine.num_free_blocks, [], 0
    prefixes = [[rng.randrange(5, 400) for _ in range(12)] for _ in range(3)]
    while submitted < 300 or engine.has_unfinished():
        for _ in range(rng.randrange(0, 12)):
            if submitted < 300:
                prompt = rng.choice(prefixes)[: rng.randrange(0, 12)]
                prompt += [rng.randrange(5, 400) for _ in range(rng.randrange(1, 16))]
                params = SamplingParams(max_tokens=rng.randrange(1, 12), ignore_eos=True)
                live.append(engine.add_request(prompt, params))
                submitted += 1
        if live and rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        engine.step()
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to force preemptions"
    assert kv.num_hit_tokens > 0, "the shared prefixes were meant to hit the cache"
    assert engine.num_free_blocks == start == kv.num_usable_blocks
    assert all(b.ref_count == 0 for b in kv.blocks)


def test_shipped_12b_config_groups_and_kv_bound():
    """`polymodal bench gemma-3-12b`'s config (built on the meta device, no weights): 48 layers in
    six groups of eight (five local, one global), and a 32k-token request's KV per layer within
    (5 x 1024 + 32k) / 6 tokens plus one block per local group."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("mm", root / "scripts" / "model_memory.py")
    model_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_memory)
    m = model_memory.memory(str(root / "sdk" / "configs" / "gemma_3_12b"), 32768, "bfloat16")
    assert m["architecture"] == "Gemma3ForCausalLM" and 11.5e9 < m["params"] < 12e9
    assert m["kv_tokens_per_layer"] <= (5 * 1024 + 32768) / 6 + 16
