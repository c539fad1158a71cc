"""EXAONE 4 against transformers on tiny random checkpoints: hybrid local (rotary, window
shorter than the prompt) / global (NoPE) layer patterns, q/k norms, post-norms only."""

import pytest

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import assert_matches_transformers, tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],  # 17 > window 8
    [7, 8, 9],
    [300 + i for i in range(40)],
]

PATTERNS = {
    "LLLG": {},
    "global_first": {"layer_types": ["full_attention"] + ["sliding_attention"] * 3},
    "no_window_all_rotary": {"sliding_window": None, "layer_types": ["full_attention"] * 4},
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_matches_transformers(tmp_path_factory, pattern):
    path = tiny_checkpoint(tmp_path_factory, "exaone4", **PATTERNS[pattern])
    engine = assert_matches_transformers(path, PROMPTS, steps=10)
    layers = engine.runner.model.model.layers
    nope = [layer.self_attn.attn.rotary is None for layer in layers]
    assert nope == ([False, False, False, True] if pattern == "LLLG" else nope)


def test_invariant_to_chunking_and_prefix_hits(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "exaone4"))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def run(**kw):
        engine = Engine(path, dtype="float32", device="cpu", **{"num_kv_blocks": 96, **kw})
        ids = [engine.add_request(p, params) for p in PROMPTS]
        final = engine.run_until_done()
        return engine, [final[i].outputs[0].token_ids for i in ids]

    _, alone = run(enable_prefix_caching=False)
    _, chunked = run(max_num_batched_tokens=5)
    engine, first = run()
    hits = engine.scheduler.kv.num_hit_tokens
    ids = [engine.add_request(p, params) for p in PROMPTS]
    final = engine.run_until_done()
    assert engine.scheduler.kv.num_hit_tokens > hits
    assert chunked == first == alone == [final[i].outputs[0].token_ids for i in ids]
