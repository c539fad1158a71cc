"""Quantized inference on a GPU (`-m gpu`; skipped without CUDA): every kernel against its
reference at real sizes, odd shapes and group boundaries; the FP8 casts on hardware; CUDA-graph
replay of quantized decode; end-to-end greedy parity with the dequantized reference.

Run: `bash scripts/test.sh -m gpu tests/llm_core/test_quant_gpu.py -q` (FP8 tests skip on cards
older than compute capability 8.9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.quantization import fp8_ops, int4_pack

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
# Qwen2.5-VL-7B's decoder shapes (N, K): qkv, o, gate_up, down; and odd ones (N not a
# multiple of the feature block, K of 3 groups)
SHAPES = [(4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (200, 384)]


def needs_fp8():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs FP8 tensor cores (compute capability 8.9+)")


def close(out, ref, rel=2e-2):
    """Max error relative to the output's scale (bf16 outputs round at ~4e-3)."""
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-6)
    assert err < rel, f"max error {err:.2e} of the output's scale"


def int4_weights(n, k, group, act_order, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g_idx = int4_pack.act_order_g_idx(k, group, gen) if act_order else None
    q, zeros, scales = int4_pack.quantize_rtn(torch.randn(n, k, generator=gen), group, g_idx)
    weight = int4_pack.dequantize(q, zeros, scales, g_idx)
    perm = None
    if act_order:
        perm = torch.argsort(g_idx.long(), stable=True)
        q, perm = q[perm], perm.to(torch.int32).to(CUDA)
    packed = int4_pack.pack_k(q).to(CUDA)
    return packed, zeros.to(torch.uint8).to(CUDA), scales.to(CUDA), perm, weight.to(CUDA)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_gemv_gpu(shape, rows, act_order, dtype):
    from polymodal.llm_core.layers.int4_gemv import int4_gemv

    n, k = shape
    group = 128
    qweight, zeros, scales, perm, weight = int4_weights(n, k, group, act_order)
    x = torch.randn(rows, k, device=CUDA).to(dtype)
    ref = F.linear(x.float(), weight)
    for _ in range(2):  # the split-K counters are back at zero
        close(int4_gemv(x, qweight, zeros, scales, group, perm), ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gemv_prefetch_gpu(shape, act_order):
    """One row with the next tile's loads issued a tile ahead (the bench's sweep variant)."""
    from polymodal.llm_core.layers.gemv import num_sms
    from polymodal.llm_core.layers.int4_gemv import gemv_config, int4_gemv

    n, k = shape
    qweight, zeros, scales, perm, weight = int4_weights(n, k, 128, act_order)
    x = torch.randn(1, k, device=CUDA).to(torch.bfloat16)
    config = (*gemv_config(1, n, k, 128, num_sms(x.device))[:4], True)
    for _ in range(2):
        out = int4_gemv(x, qweight, zeros, scales, 128, perm, config=config)
        close(out, F.linear(x.float(), weight))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [5, 100, 1000])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gemm_gpu(shape, rows, act_order):
    from polymodal.llm_core.layers.int4_kernels import int4_gemm

    n, k = shape
    qweight, zeros, scales, perm, weight = int4_weights(n, k, 128, act_order, seed=rows)
    x = torch.randn(rows, k, device=CUDA)
    for dtype in (torch.bfloat16, torch.float16):  # weights times 2^-38 / scaled back first
        ref = F.linear(x.to(dtype).float(), weight.to(dtype).float())
        close(int4_gemm(x.to(dtype), qweight, zeros, scales, 128, perm), ref)
    out32 = int4_gemm(x, qweight, zeros, scales, 128, perm)  # fp32: exact dots
    # fp32 sums of 18944 products in another order differ by ~1e-6 of the output's scale; a
    # wrong scale, zero or permutation shows at ~1e-2
    close(out32, F.linear(x, weight), rel=2e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_dense_path_gpu(shape, act_order, dtype):
    """From INT4_DENSE_MIN_ROWS rows: the dequantized weight equals the reference's rounded
    once to x's dtype (bit for bit; act order: rows in x's feature order), and cuBLAS on it
    (what `Int4LinearMethod` picks for 1100 rows) matches the reference product."""
    from polymodal.llm_core.layers import int4_kernels
    from polymodal.llm_core.quantization.int4 import int4_kernel

    n, k = shape
    qweight, zeros, scales, perm, weight = int4_weights(n, k, 128, act_order, seed=3)
    dense = int4_kernels.int4_dequantize(qweight, zeros, scales, 128, perm, dtype)
    assert torch.equal(dense, weight.t().to(dtype))
    x = torch.randn(1100, k, device=CUDA).to(dtype)
    bias = torch.randn(n, device=CUDA).to(dtype)
    kernel = int4_kernel(x.shape[0])
    assert kernel is int4_kernels.int4_matmul_dequantized
    out = kernel(x, qweight, zeros, scales, 128, perm, bias)
    close(out, F.linear(x.float(), weight.to(dtype).float(), bias.float()))


@pytest.mark.parametrize("group", [None, 128])
def test_fp8_quantize_rows_on_hardware(group):
    """The hardware cast rounds as torch's (the interpreter's does not, near powers of two)."""
    needs_fp8()
    from polymodal.llm_core.layers.fp8_kernels import quantize_rows

    x = torch.randn(33, 3584, device=CUDA).to(torch.bfloat16)
    xq, xs = quantize_rows(x, group)
    ref_q, ref_s = fp8_ops.quantize_per_token(x, group)
    torch.testing.assert_close(xs, ref_s.reshape(xs.shape), rtol=1e-6, atol=0)
    mismatch = (xq.float() != ref_q.float()).float().mean().item()
    assert mismatch < 1e-3  # division rounding may differ at exact ties only


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", ["channel", "block"])
@pytest.mark.parametrize("rows", [1, 2, 7, 17, 64, 65, 300])
def test_fp8_linear_gpu(shape, strategy, rows):
    """`Fp8LinearMethod.apply` on each path (GEMV at 1 row; the Triton GEMM's narrow tiles to
    64 rows, _scaled_mm above, the Triton GEMM for block scales) against the W8A8 reference
    on the same FP8 numbers; one row per channel is W8A16 (the 16-bit GEMV on E4M3 weights):
    x as it is times the dequantized weight."""
    needs_fp8()
    from polymodal.llm_core.layers.linear import Linear
    from polymodal.llm_core.quantization.fp8 import Fp8LinearMethod, Fp8Scheme

    n, k = shape
    scheme = Fp8Scheme("compressed-tensors", strategy)
    layer = Linear(k, n, bias=True, method=Fp8LinearMethod(scheme), device=CUDA)
    w, scale = fp8_ops.quantize_weight(torch.randn(n, k, device=CUDA) / k**0.5, strategy)
    layer.weight.data.copy_(w)
    layer.weight_scale.data.copy_(scale)
    layer.bias.data.normal_()
    layer.post_load()
    x = torch.randn(rows, k, device=CUDA).to(torch.bfloat16)
    ref = fp8_ops.w8a8_reference(x.float(), w, scale, scheme.block, layer.bias.float())
    if rows == 1 and strategy == "channel":
        deq = fp8_ops.dequantize_weight(w, scale)
        ref = F.linear(x.float(), deq, layer.bias.float())
    close(layer(x), ref)


@pytest.mark.parametrize("split_k", [2, 4])
@pytest.mark.parametrize("rows", [5, 32, 200])
def test_fp8_gemm_split_k_gpu(rows, split_k):
    """The Triton FP8 GEMM with K cut into fp32 planes (a 7B's down projection, K 18944; the
    bias in one plane) against the reference, and the same bits on a second call (the planes
    are added in order, no atomics)."""
    needs_fp8()
    from polymodal.llm_core.layers import fp8_kernels

    n, k = 3584, 18944
    w, scale = fp8_ops.quantize_weight(torch.randn(n, k, device=CUDA) / k**0.5, "channel")
    x = torch.randn(rows, k, device=CUDA).to(torch.bfloat16)
    bias = torch.randn(n, device=CUDA).to(torch.bfloat16)
    config = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": split_k}
    out = fp8_kernels.fp8_gemm(x, w, scale, None, bias, config=config)
    close(out, fp8_ops.w8a8_reference(x.float(), w, scale, None, bias.float()))
    assert torch.equal(out, fp8_kernels.fp8_gemm(x, w, scale, None, bias, config=config))


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.05, 0.2)])
def test_fp8_kv_cache_kernels_gpu(splits, scales):
    """Store + prefill + decode + the fused rope_decode on an FP8 cache against the torch
    reference attention on the same cache (bf16 queries)."""
    needs_fp8()
    from polymodal.llm_core.attention import TorchAttentionBackend, triton_backend
    from tests.helpers import spec_for
    from tests.llm_core.test_triton_kernels import make_batch

    q, cache, meta = make_batch([1] * 5, [1, 15, 16, 300, 1000], heads=28, kv_heads=4,
                                head_dim=128, dtype=torch.bfloat16)  # fmt: skip
    q = q.to(CUDA)
    cache = (cache.to(CUDA).float() * 8 * scales[0]).to(torch.float8_e4m3fn)
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        setattr(meta, name, getattr(meta, name).to(CUDA))
    spec = spec_for(q, cache, 128**-0.5)
    backend = triton_backend.TritonAttentionBackend(splits)
    ref = TorchAttentionBackend().paged_attention(q, cache, meta, spec, scales)
    close(backend.paged_attention(q, cache, meta, spec, scales), ref)
    meta.is_decode = False
    close(backend.paged_attention(q, cache, meta, spec, scales), ref)


def _quantized_checkpoints(tmp_path_factory):
    from tests.helpers import tiny_checkpoint
    from tests.llm_core.quant_checkpoints import write_fp8_checkpoint, write_int4_checkpoint

    src = tiny_checkpoint(tmp_path_factory, "qwen2", hidden_size=128, intermediate_size=256)
    root = tmp_path_factory.mktemp("gpu-quant")
    awq, awq_ref = write_int4_checkpoint(src, root / "awq", "awq", group_size=64)
    gptq, gptq_ref = write_int4_checkpoint(src, root / "gptq", "gptq", 64, desc_act=True)
    fp8 = write_fp8_checkpoint(src, root / "fp8", "compressed-tensors", "channel")
    return {"awq": (awq, awq_ref), "gptq": (gptq, gptq_ref), "fp8": (fp8, None)}


def _greedy(path, steps=24, **kw):
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits

    # two prompts: graphs for up to 4 sequences (the card's default captures up to 512)
    kw = {"num_kv_blocks": 64, "max_num_seqs": 4, "max_num_batched_tokens": 256, **kw}
    engine = Engine(str(path), device="cuda", **kw)
    seen = record_logits(engine)
    prompts = [[5, 17, 42, 99, 3, 250, 77, 13], [8, 31, 64]]
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    out = engine.run_until_done()
    return [out[i].outputs[0].token_ids for i in ids], seen


@pytest.mark.parametrize("fmt", ["awq", "gptq", "fp8"])
def test_quantized_decode_graph_replay_equals_eager(tmp_path_factory, fmt):
    """CUDA graphs of quantized decode (GEMVs, split-K counters, FP8 quantization) replay the
    eager steps: the same tokens and logits, at batch 1 (GEMV) and 2."""
    if fmt == "fp8":
        needs_fp8()
    path = _quantized_checkpoints(tmp_path_factory)[fmt][0]
    eager, eager_logits = _greedy(path, dtype="bfloat16", cuda_graphs=False)
    graphs, graph_logits = _greedy(path, dtype="bfloat16")
    assert graphs == eager
    for a, b in zip(graph_logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_greedy_parity_with_the_dequantized_reference(tmp_path_factory, fmt):
    """fp32: the INT4 kernels' dequantization is exact and their dots ieee, so tokens equal the
    16-bit run of the dequantized weights and logits agree to 1e-3."""
    path, ref = _quantized_checkpoints(tmp_path_factory)[fmt]
    tokens, logits = _greedy(path, dtype="float32")
    ref_tokens, ref_logits = _greedy(ref, dtype="float32")
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_fp8_greedy_parity_with_the_cpu_reference(tmp_path_factory):
    """FP8 on the GPU (GEMV + _scaled_mm in bf16) against the CPU's W8A8 reference (fp32):
    the prefill logits within bf16 rounding, and the greedy tokens reported."""
    needs_fp8()
    path = _quantized_checkpoints(tmp_path_factory)["fp8"][0]
    tokens, logits = _greedy(path, dtype="bfloat16")
    from polymodal.llm_core.engine import Engine

    cpu = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=64)
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits

    seen = record_logits(cpu)
    rid = cpu.add_request([5, 17, 42, 99, 3, 250, 77, 13], SamplingParams(temperature=0.0,
                          max_tokens=24, ignore_eos=True))  # fmt: skip
    cpu_tokens = cpu.run_until_done()[rid].outputs[0].token_ids
    # the GPU quantizes bf16 activations, the CPU fp32 ones, and the random model amplifies
    # it (greedy agreement ~8%): H100, prompt rows on cuBLAS 4.3e-2, on the Triton GEMM's
    # narrow tiles (the default to 64 rows) 5.0e-2; each linear alone holds 2e-2 above
    close(logits[0][0].cpu(), seen[0][0], rel=6e-2)
    agree = sum(a == b for a, b in zip(tokens[0], cpu_tokens)) / len(cpu_tokens)
    print(f"FP8 GPU (bf16) vs CPU reference (fp32): greedy agreement {agree:.0%}")
