"""DeepSeek-V3 against transformers on tiny random checkpoints: MLA (q LoRA or not, interleaved
or neox rotary, YaRN with mscale), prefill in the expanded form and decode in the absorbed
form over the latent cache, dense first layers, grouped sigmoid routing with a correction bias
and shared experts; the latent cache's size; the MTP layer's tensors skipped; invariances."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import assert_matches_transformers, run_preempted, tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],
    [7, 8, 9],
    [300 + i for i in range(40)],
]

VARIANTS = {
    "grouped_yarn_interleaved": {},
    "no_q_lora_neox_rotary": {"q_lora_rank": None, "rope_interleave": False},
    "ungrouped_default_rope_two_dense": {
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_transformers(tmp_path_factory, variant):
    path = tiny_checkpoint(tmp_path_factory, "deepseek_v3", **VARIANTS[variant])
    engine = assert_matches_transformers(path, PROMPTS, steps=10)
    # one latent vector per token and layer: kv_lora_rank + qk_rope_head_dim numbers
    caches = engine.runner.kv_caches
    assert len(caches) == 3 and all(c.shape[0] == 1 and c.shape[-2:] == (1, 16 + 8) for c in caches)


def test_chunked_prefill_and_decode_in_the_interpreted_triton_kernels(tmp_path_factory):
    """The Triton backend on CPU (interpreted): the paged prefill kernel over the expanded keys
    and values, the MLA decode kernel over the latent cache; a prompt split across steps."""
    pytest.importorskip("triton")
    from tests.llm_core import interpreted

    if not interpreted.IN_PROCESS:
        pytest.skip("the Triton kernels are compiled in this process (GPU tests cover them)")
    path = tiny_checkpoint(tmp_path_factory, "deepseek_v3")
    assert_matches_transformers(
        path, PROMPTS[:2], steps=5, logit_steps=5, attention_backend="triton",
        max_num_batched_tokens=12,
    )  # fmt: skip


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _run(engine, prompts):
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


def test_invariant_to_batch_chunking_preemption_and_prefix_hits(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "deepseek_v3"))

    def engine(**kw):
        return Engine(path, dtype="float32", device="cpu", **{"num_kv_blocks": 128, **kw})

    alone = [_run(engine(enable_prefix_caching=False), [p])[0] for p in PROMPTS]
    assert _run(engine(), PROMPTS) == alone
    assert _run(engine(max_num_batched_tokens=5), PROMPTS) == alone
    tiny = engine(num_kv_blocks=14, block_size=4, max_num_batched_tokens=8,
                  enable_prefix_caching=False)  # fmt: skip
    assert run_preempted(tiny, PROMPTS, GREEDY) == alone
    assert tiny.num_free_blocks == 14
    cached = engine()
    first = _run(cached, PROMPTS)
    hits = cached.scheduler.kv.num_hit_tokens
    assert _run(cached, PROMPTS) == first == alone
    assert cached.scheduler.kv.num_hit_tokens > hits


def test_mtp_layer_tensors_are_skipped(tmp_path_factory, tmp_path):
    """A checkpoint with the multi-token-prediction layer (index num_hidden_layers: its own
    decoder layer plus enorm / hnorm / eh_proj / shared_head) loads and generates the same."""
    import shutil

    path = tiny_checkpoint(tmp_path_factory, "deepseek_v3")
    for f in path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name].clone()
    for extra in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.head.weight"):
        tensors[f"model.layers.3.{extra}"] = torch.ones(4, 4)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with_mtp = Engine(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)
    plain = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    assert _run(with_mtp, PROMPTS[:1]) == _run(plain, PROMPTS[:1])
    config["num_nextn_predict_layers"] = 0  # without the declaration they are unexpected
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"unexpected tensors.*model\.layers\.3\."):
        Engine(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=64)


def test_reduced_config_kv_per_token_and_memory():
    """The shipped reduced-depth config: V3's widths, 3 layers; the latent cache holds
    (kv_lora_rank + qk_rope_head_dim) x layers x 2 bytes per token."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("mm", root / "scripts" / "model_memory.py")
    model_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_memory)
    m = model_memory.memory(str(root / "sdk" / "configs" / "deepseek_v3_reduced"), 32768,
                            "bfloat16")  # fmt: skip
    assert m["architecture"] == "DeepseekV3ForCausalLM"
    assert m["kv_gib"] * 2**30 == 32768 * (512 + 64) * 3 * 2
    assert m["weights_gib"] < 60  # leaves room for transformers' copy on a 141 GiB H200
