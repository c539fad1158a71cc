"""INT4 weight-only checkpoints (AWQ GEMM layout, GPTQ with and without act order) on CPU:
the packing as the formats document it, loading, and whole-model logits against transformers
running the dequantized weights (dequantize-then-fp32: transformers loads AWQ/GPTQ only
through GPU kernel packages)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.quantization import int4_pack
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import hf_greedy, record_logits, tiny_checkpoint
from tests.llm_core.quant_checkpoints import write_int4_checkpoint

PROMPT = [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29]


def test_awq_nibble_order_is_the_documented_one():
    """AutoAWQ's GEMM packing: nibble i (bits 4i..4i+3) of an int32 holds output feature
    [0, 2, 4, 6, 1, 3, 5, 7][i] of its 8; GPTQ's holds input feature 8r + i."""
    q = torch.arange(8, dtype=torch.int32).repeat(2, 1)  # [K=2, N=8]: feature n has value n
    qweight, _ = int4_pack.pack_awq(q, torch.zeros(1, 8, dtype=torch.int32))
    nibbles = [(int(qweight[0, 0]) >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [0, 2, 4, 6, 1, 3, 5, 7]
    q = torch.arange(8, dtype=torch.int32)[:, None].repeat(1, 3)  # [K=8, N=3]: row k = k
    packed = int4_pack.pack_k(q)
    assert packed.shape == (1, 3) and [(int(packed[0, 1]) >> (4 * i)) & 0xF for i in range(8)] == [
        *range(8)
    ]
    _, qzeros = int4_pack.pack_gptq(q, torch.full((1, 8), 8, dtype=torch.int32))
    assert int(qzeros[0, 0]) == 0x77777777  # v1 stores zero - 1 (sym: 8 -> 7)


@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq_v2"])
def test_pack_unpack_round_trip(fmt):
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 24), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 16, (2, 24), generator=gen, dtype=torch.int32)
    if fmt == "awq":
        q2, z2 = int4_pack.unpack_awq(*int4_pack.pack_awq(q, zeros))
    else:
        v2 = fmt == "gptq_v2"
        q2, z2 = int4_pack.unpack_gptq(*int4_pack.pack_gptq(q, zeros, v2), v2)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)


def test_rtn_quantization_error_is_bounded():
    """Round-to-nearest: every weight within half a step of its group's grid."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=gen)
    for g_idx in (None, int4_pack.act_order_g_idx(64, 32, gen)):
        q, zeros, scales = int4_pack.quantize_rtn(w, 32, g_idx)
        deq = int4_pack.dequantize(q, zeros, scales, g_idx)
        idx = (torch.arange(64) // 32) if g_idx is None else g_idx.long()
        step = scales.float()[idx].t()  # [N, K]
        assert ((deq - w).abs() <= step * 0.5 + 1e-6).all()


CASES = {
    "awq-g32-llama": ("llama", dict(fmt="awq", group_size=32), {}),
    "awq-g128-qwen2": (
        "qwen2",
        dict(fmt="awq", group_size=128),
        dict(hidden_size=128, intermediate_size=256),
    ),
    "gptq-g32-qwen2": ("qwen2", dict(fmt="gptq", group_size=32, sym=True), {}),
    "gptq-actorder-g32-llama": ("llama", dict(fmt="gptq", group_size=32, desc_act=True), {}),
    "gptq-v2-actorder-qwen3": (
        "qwen3",
        dict(fmt="gptq", group_size=64, desc_act=True, v2=True),
        {},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_int4_checkpoint_matches_dequantized_transformers(tmp_path_factory, case):
    arch, fmt_kwargs, overrides = CASES[case]
    src = tiny_checkpoint(tmp_path_factory, arch, **overrides)
    quant_dir, ref_dir = write_int4_checkpoint(
        src, tmp_path_factory.mktemp(case) / "q", **fmt_kwargs
    )
    hf = tf.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ref_tokens, ref_logits = hf_greedy(hf, PROMPT, 12)
    engine = Engine(str(quant_dir), dtype="float32", device="cpu", num_kv_blocks=64)
    layer = engine.runner.model.model.layers[0]
    assert type(layer.self_attn.qkv_proj.method).__name__ == "Int4LinearMethod"
    assert type(engine.runner.model.lm_head.method).__name__ == "UnquantizedLinearMethod"
    seen = record_logits(engine)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request(PROMPT, params, request_id="r")
    out = engine.run_until_done()["r"]
    assert out.outputs[0].token_ids == ref_tokens
    for step in range(9):
        diff = (seen[step][0] - ref_logits[step]).abs().max().item()
        assert diff <= 1e-4, f"{case} step {step}: max abs logit diff {diff:.2e}"
