"""Every family added with the seams, on CUDA: the Triton backend with CUDA graphs (decode and
prefill), fp32, against transformers (greedy tokens identical, logits within 1e-4); and in
bf16 with the batch-1 GEMV, the same tokens as the cuBLAS engine while they agree."""

import pytest
import torch

from tests.helpers import assert_matches_transformers, record_logits, tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],
    [7, 8, 9],
    [300 + i for i in range(40)],
]
FAMILIES = {  # demo name: overrides
    "gemma3": {},
    "gemma3_global_first": {
        "num_hidden_layers": 4,
        "layer_types": [
            "full_attention",
            "sliding_attention",
            "sliding_attention",
            "full_attention",
        ],
    },
    "gemma3_head_dim_256": {"head_dim": 256},  # 32-key decode tiles (decode_block_n)
    "exaone4": {},
    "exaone4_global_first": {"layer_types": ["full_attention"] + ["sliding_attention"] * 3},
    "nemotron": {},
    "mixtral": {},
    "mixtral_top2_window_8": {"num_experts_per_tok": 2, "sliding_window": 8},
    "qwen3_moe": {},
    "qwen3_moe_sparse_step_2": {"decoder_sparse_step": 2, "mlp_only_layers": []},
    "deepseek_v3": {},
    "deepseek_v3_no_q_lora": {"q_lora_rank": None, "rope_interleave": False},
    "llama4": {},
    "llama4_top2_nope_first": {
        "num_experts_per_tok": 2,
        "interleave_moe_layer_step": 1,
        "no_rope_layers": [0, 1, 1, 0],
    },
}


def _checkpoint(tmp_path_factory, name):
    from polymodal.demo_model import tiny_configs

    # the demo architecture: the longest demo name the family name starts with
    arch = max((a for a in tiny_configs() if name == a or name.startswith(a + "_")), key=len)
    return tiny_checkpoint(tmp_path_factory, arch, **FAMILIES[name])


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("chunk", [4096, 8])  # whole prompts, and chunks below the window
def test_fp32_triton_graphs_match_transformers(tmp_path_factory, name, chunk):
    path = _checkpoint(tmp_path_factory, name)
    engine = assert_matches_transformers(
        path, PROMPTS, steps=10, device="cuda", attention_backend="triton",
        max_num_batched_tokens=chunk,
    )  # fmt: skip
    assert engine.runner.graphs is not None and engine.runner.graphs.runs > 0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_gemv_engine_matches_cublas(tmp_path_factory, name):
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.layers.moe import SparseMoeBlock
    from polymodal.llm_core.sampling_params import SamplingParams

    path = _checkpoint(tmp_path_factory, name)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    runs = {}
    for gemv in (True, False):
        engine = Engine(str(path), dtype="bfloat16", device="cuda", decode_gemv=gemv)
        blocks = [m for m in engine.runner.model.modules() if isinstance(m, SparseMoeBlock)]
        # every sparse block (Mixtral, Qwen3-MoE, DeepSeek-V3 with its shared expert) decodes
        # on the fused moe_decode path with the GEMV, and only then
        assert all(block.fused_decode == gemv for block in blocks), name
        seen = record_logits(engine)
        rid = engine.add_request(PROMPTS[0], params)
        runs[gemv] = (seen, engine.run_until_done()[rid].outputs[0].token_ids)
    (fast, fast_tokens), (ref, ref_tokens) = runs[True], runs[False]
    for step in range(8):
        torch.testing.assert_close(fast[step], ref[step], atol=5e-2, rtol=0, msg=f"step {step}")
        if fast_tokens[step] != ref_tokens[step]:
            break


def test_pooling_models_on_cuda(tmp_path_factory):
    """BERT (classifier and embedding models, with Dense modules too), RoBERTa (varlen Triton
    attention, no KV cache), the Qwen2 reward model and a Qwen3 embedder (paged Triton
    attention, chunked) on CUDA in fp32: the CPU engine's pooled outputs within 1e-4."""
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.pooling import PoolingParams

    for name in ("bert_cls", "bert_st_mean", "bert_st_dense", "roberta_embed", "roberta_cls",
                 "qwen2_rm", "qwen3_embed"):  # fmt: skip
        path = str(tiny_checkpoint(tmp_path_factory, name))
        results = []
        for device in ("cpu", "cuda"):
            engine = Engine(path, dtype="float32", device=device, max_num_batched_tokens=64)
            ids = [engine.add_request(p, PoolingParams(task="encode")) for p in PROMPTS]
            final = engine.run_until_done()
            results.append([final[i].outputs.data for i in ids])
        for cpu, cuda in zip(*results):
            assert (cpu - cuda).abs().max() <= 1e-4, name
