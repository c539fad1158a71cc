"""Every text decoder matches transformers on the same tiny random weights (fp32, CPU)."""

import pytest
import torch
import transformers as tf

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import hf_greedy, record_logits, tiny_checkpoint

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]
PROMPT = [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29]  # 17: spans 2 blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_tokens_match_transformers(tmp_path_factory, arch):
    path = tiny_checkpoint(tmp_path_factory, arch)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_tokens, ref_logits = hf_greedy(hf, PROMPT, 32)

    engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    seen = record_logits(engine)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    engine.add_request(PROMPT, params, request_id="r")
    out = engine.run_until_done()["r"]

    assert out.outputs[0].token_ids == ref_tokens
    # prefill (step 0) and 8 decode steps: max abs diff <= 1e-4
    for step in range(9):
        diff = (seen[step][0] - ref_logits[step]).abs().max().item()
        assert diff <= 1e-4, f"{arch} step {step}: max abs logit diff {diff:.2e}"


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    """A sharded index (several files) loads; tied LM head shares the embedding, no lm_head."""
    from polymodal.demo_model import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "sharded" / name).write_bytes((path / name).read_bytes())
    shards = list((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ref_tokens, _ = hf_greedy(hf, PROMPT, 12)
    engine = Engine(str(tmp_path / "sharded"), dtype="float32", device="cpu", num_kv_blocks=32)
    model = engine.runner.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    rid = engine.add_request(
        PROMPT, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    )
    assert engine.run_until_done()[rid].outputs[0].token_ids == ref_tokens


def test_llama_attention_bias_covers_o_proj(tmp_path_factory):
    """Llama's `attention_bias` puts biases on q/k/v and o_proj (Qwen2: q/k/v only)."""
    from tests.helpers import assert_matches_transformers

    path = tiny_checkpoint(tmp_path_factory, "llama", attention_bias=True)
    engine = assert_matches_transformers(path, [PROMPT], steps=8)
    assert engine.runner.model.model.layers[0].self_attn.o_proj.bias is not None
