"""Mixtral and Qwen3-MoE against transformers on tiny random checkpoints (several experts per
token, dense layers from `mlp_only_layers` / `decoder_sparse_step`, with and without
renormalised routing, a window shorter than the prompt), and the engine's invariances."""

import pytest

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.layers.moe import SparseMoeBlock
from polymodal.llm_core.models.llama import MLP
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import assert_matches_transformers, run_preempted, tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],
    [7, 8, 9],
    [300 + i for i in range(40)],
]

VARIANTS = {  # name: (demo arch, overrides)
    "mixtral": ("mixtral", {}),
    "mixtral_top2_window_8": ("mixtral", {"num_experts_per_tok": 2, "sliding_window": 8}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe_sparse_step_2_unnormalized": (
        "qwen3_moe",
        {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": False},
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers(tmp_path_factory, variant):
    arch, overrides = VARIANTS[variant]
    path = tiny_checkpoint(tmp_path_factory, arch, **overrides)
    engine = assert_matches_transformers(path, PROMPTS, steps=10)
    layers = engine.runner.model.model.layers
    sparse = [isinstance(getattr(layer, layer.mlp_name), SparseMoeBlock) for layer in layers]
    expected = {
        "qwen3_moe": [True, False, True, True],
        "qwen3_moe_sparse_step_2_unnormalized": [False, True, False, True],
    }.get(variant, [True] * len(layers))
    assert sparse == expected
    assert all(isinstance(getattr(layer, layer.mlp_name), MLP) != s for layer, s in
               zip(layers, sparse))  # fmt: skip


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _run(engine, prompts):
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_invariant_to_batch_chunking_preemption_and_prefix_hits(tmp_path_factory, arch):
    path = str(tiny_checkpoint(tmp_path_factory, arch))

    def engine(**kw):
        return Engine(path, dtype="float32", device="cpu", **{"num_kv_blocks": 128, **kw})

    alone = [_run(engine(enable_prefix_caching=False), [p])[0] for p in PROMPTS]
    assert _run(engine(), PROMPTS) == alone  # one batch: tokens route to experts together
    assert _run(engine(max_num_batched_tokens=5), PROMPTS) == alone  # chunked prefill
    tiny = engine(num_kv_blocks=14, block_size=4, max_num_batched_tokens=8,
                  enable_prefix_caching=False)  # fmt: skip
    assert run_preempted(tiny, PROMPTS, GREEDY) == alone
    cached = engine()
    first = _run(cached, PROMPTS)
    hits = cached.scheduler.kv.num_hit_tokens
    assert _run(cached, PROMPTS) == first == alone
    assert cached.scheduler.kv.num_hit_tokens > hits
