"""Every RoPE scaling a supported config can carry matches transformers (fp32 logits, greedy)."""

import pytest
import torch
import transformers as tf

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import hf_greedy, record_logits, tiny_checkpoint

PROMPT = [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29, 31, 37, 41]

_SHORT = [1.0 + i / 16 for i in range(8)]
_LONG = [2.0 + i / 8 for i in range(8)]
SCALINGS = {
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 2.0}),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn": ("qwen3", {"rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 512}),
    "longrope": ("phi3", {"rope_type": "longrope", "partial_rotary_factor": 1.0,
                          "short_factor": _SHORT, "long_factor": _LONG,
                          "original_max_position_embeddings": 512}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path_factory, name):
    arch, rope = SCALINGS[name]
    overrides = {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    if name == "longrope":  # phi3 reads the original length from the config itself
        overrides["original_max_position_embeddings"] = 512
        overrides["max_position_embeddings"] = 2048
    path = tiny_checkpoint(tmp_path_factory, arch, **overrides)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == rope["rope_type"]
    ref_tokens, ref_logits = hf_greedy(hf, PROMPT, 12)
    engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=32)
    seen = record_logits(engine)
    rid = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert engine.run_until_done()[rid].outputs[0].token_ids == ref_tokens
    for step in range(9):
        diff = (seen[step][0] - ref_logits[step]).abs().max().item()
        assert diff <= 1e-4, f"{name} step {step}: {diff:.2e}"


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_tables_build_on_the_models_device(name):
    """transformers' init functions compute on "cpu": the tables land on the device the model
    is built on (here meta, as `scripts/model_memory.py` builds; a CUDA build mixed devices)."""
    from polymodal.llm_core.layers.rotary import RotaryEmbedding

    arch, rope = SCALINGS[name]
    cfg = getattr(tf, {"llama": "LlamaConfig", "qwen3": "Qwen3Config", "phi3": "Phi3Config"}[arch])(
        head_dim=16, hidden_size=64, num_attention_heads=4, max_position_embeddings=2048,
        rope_parameters={"rope_theta": 10000.0, **rope}, original_max_position_embeddings=512,
    )  # fmt: skip
    with torch.device("meta"):
        rotary = RotaryEmbedding(cfg, 16, 1024)
    assert rotary.cos_sin_cache.device.type == "meta"
    assert rotary.spec.rotary_dim == 16
