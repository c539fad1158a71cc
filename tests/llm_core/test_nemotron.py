"""Nemotron against transformers on tiny random checkpoints: LayerNorm1P, squared-ReLU MLP,
partial rotary (half, a quarter, all of each head), with and without biases."""

import pytest

from tests.helpers import assert_matches_transformers, tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],
    [7, 8, 9],
    [300 + i for i in range(40)],
]


def _rope(partial):
    return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}


VARIANTS = {
    "half_rotary": {},
    "quarter_rotary_biases": {
        "rope_parameters": _rope(0.25),
        "attention_bias": True,
        "mlp_bias": True,
    },
    "full_rotary": {"rope_parameters": _rope(1.0)},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers(tmp_path_factory, variant):
    path = tiny_checkpoint(tmp_path_factory, "nemotron", **VARIANTS[variant])
    engine = assert_matches_transformers(path, PROMPTS, steps=10, max_num_batched_tokens=16)
    partial = (VARIANTS[variant].get("rope_parameters") or _rope(0.5))["partial_rotary_factor"]
    assert engine.model_config.rotary_dim == int(16 * partial)
