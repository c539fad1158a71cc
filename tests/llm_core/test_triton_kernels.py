"""Every Triton kernel against its torch reference, on CPU under TRITON_INTERPRET=1.

Triton decides interpret vs compile when it is imported, so the flag is set here before any
import of triton. Where that cannot hold in this process (a CUDA machine, whose GPU tests need
compiled kernels, or triton already imported), `test_interpreted_in_subprocess` reruns this file
in a fresh interpreter-mode process instead.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or (
    "triton" not in sys.modules and not torch.cuda.is_available()
)
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

from polymodal.llm_core.attention import (  # noqa: E402
    AttentionMetadata,
    TorchAttentionBackend,
    triton_backend,  # noqa: E402
)
from polymodal.llm_core.layers import gemv as gemv_ops  # noqa: E402
from polymodal.llm_core.layers import triton_ops  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}  # interp. bf16 truncates
REF = TorchAttentionBackend()


@pytest.fixture(autouse=True)
def _interpreted_only(request, monkeypatch):
    """Skip in-process tests where triton compiles; poison every fresh allocation with NaN."""
    if not IN_PROCESS and request.node.name != "test_interpreted_in_subprocess":
        pytest.skip("kernels are compiled in this process; see test_interpreted_in_subprocess")
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


def test_interpreted_in_subprocess():
    """Rerun this file with TRITON_INTERPRET=1 and no GPU when it cannot run in process."""
    if IN_PROCESS:
        pytest.skip("ran in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


def make_batch(q_lens, seq_lens, heads=4, kv_heads=2, head_dim=32, page=16, dtype=torch.float32):
    """Random paged cache + metadata; each sequence gets shuffled physical blocks."""
    gen = torch.Generator().manual_seed(sum(seq_lens) + heads + head_dim)
    pages = [-(-s // page) for s in seq_lens]
    num_blocks = sum(pages) + 3
    cache = torch.randn(2, num_blocks, page, kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(pages) + 2, dtype=torch.int32)  # padded
    used = 0
    for s, n in enumerate(pages):
        block_tables[s, :n] = perm[used : used + n]
        used += n
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        slot_mapping=torch.full((sum(q_lens),), -1, dtype=torch.int64),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        is_decode=all(n == 1 for n in q_lens),
    )
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    return q, cache, meta


def assert_close(out, ref, dtype):
    assert not out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv(dtype):
    k = torch.randn(9, 3, 24, dtype=dtype)
    v = torch.randn(9, 3, 24, dtype=dtype)
    slots = torch.tensor([5, -1, 0, 15, 16, 17, -1, 40, 33], dtype=torch.int64)  # page 16
    cache = torch.randn(2, 4, 16, 3, 24).to(dtype)
    expected = cache.clone()
    REF.store_kv(k, v, expected, slots)
    triton_backend.TritonAttentionBackend().store_kv(k, v, cache, slots)
    assert torch.equal(cache, expected)  # written slots copied exactly, others untouched


PREFILL_CASES = {  # name: (q_lens, seq_lens)
    "len15": ([15], [15]),
    "len16": ([16], [16]),
    "len17": ([17], [17]),
    "several_odd": ([1, 7, 33], [1, 7, 33]),
    "cached_prefix": ([5, 17, 1, 3], [21, 17, 16, 35]),
}


@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2), (6, 2)])
def test_paged_prefill(case, heads, kv_heads):
    q, cache, meta = make_batch(*PREFILL_CASES[case], heads=heads, kv_heads=kv_heads)
    meta.is_decode = False  # q_len 1 sequences go through the prefill kernel here too
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, 0.2)
    assert_close(out, REF.paged_attention(q, cache, meta, 0.2), torch.float32)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_paged_prefill_sliding_window(window):
    q, cache, meta = make_batch([5, 17, 20], [21, 17, 40])
    meta.is_decode = False
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, 0.2, window)
    assert_close(out, REF.paged_attention(q, cache, meta, 0.2, window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_prefill_half_and_odd_head_dim(dtype):
    q, cache, meta = make_batch([5, 17], [21, 17], head_dim=24, page=8, dtype=dtype)
    out = triton_backend.TritonAttentionBackend().paged_attention(q, cache, meta, 0.2)
    assert out.dtype == dtype
    assert_close(out, REF.paged_attention(q, cache, meta, 0.2), dtype)


@pytest.mark.parametrize("splits", [None, 1, 3, 8])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_decode(splits, window):
    """splits: heuristic, single pass, split-KV, and more splits than tiles (empty splits).
    Twice: the last split merges only if the arrival counters were left at zero."""
    q, cache, meta = make_batch([1] * 5, [1, 15, 16, 17, 70], heads=6, kv_heads=2)
    assert meta.is_decode
    backend = triton_backend.TritonAttentionBackend(splits)
    for _ in range(2):
        out = backend.paged_attention(q, cache, meta, 0.3, window)
        assert_close(out, REF.paged_attention(q, cache, meta, 0.3, window), torch.float32)


@pytest.mark.parametrize("window", [None, 50])
def test_paged_decode_scales_splits_to_the_context(window):
    """A split count that is a maximum (`min_split_keys`): contexts of 1, 40, 100 and 200 keys
    use 1, 2, 4 and 4 of 4 splits at 32 keys a split (one split writes the output directly);
    twice, so the arrival counters of the merged ones must be back at zero."""
    from polymodal.llm_core.attention.triton_decode import paged_decode

    q, cache, meta = make_batch([1] * 4, [1, 40, 100, 200], heads=4, kv_heads=2)
    want = REF.paged_attention(q, cache, meta, 0.3, window)
    for _ in range(2):
        out = paged_decode(
            q, cache, meta.block_tables, meta.seq_lens, 0.3, window, 4, 16, min_split_keys=32
        )
        assert_close(out, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_half(dtype):
    q, cache, meta = make_batch([1, 1], [33, 9], heads=8, kv_heads=1, head_dim=24, dtype=dtype)
    for splits in (1, 2):
        out = triton_backend.TritonAttentionBackend(splits).paged_attention(q, cache, meta, 0.3)
        assert_close(out, REF.paged_attention(q, cache, meta, 0.3), dtype)


def test_decode_split_heuristic():
    pick = triton_backend.decode_num_splits
    assert pick(64, 8, 8192, 132, 16) == 1  # enough programs already
    assert pick(1, 4, 4096, 132, 16) == 16  # one long sequence: split, capped
    assert pick(1, 4, 512, 132, 16) == 512 // triton_backend.MIN_KEYS_PER_SPLIT  # short context
    assert pick(1, 4, 40, 132, 16) == 1
    assert pick(0, 4, 16, 132, 16) == 1


def test_store_then_decode_matches_reference():
    """store_kv + decode through the backend equal the reference doing the same."""
    q, cache, meta = make_batch([1, 1], [17, 32], heads=4, kv_heads=2)
    k, v = torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    meta.slot_mapping = meta.block_tables[:, 1].long() * 16 + torch.tensor([0, 15])  # pos 16, 31
    ref_cache = cache.clone()
    REF.store_kv(k, v, ref_cache, meta.slot_mapping)
    backend = triton_backend.TritonAttentionBackend(2)
    backend.store_kv(k, v, cache, meta.slot_mapping)
    out = backend.paged_attention(q, cache, meta, 0.25)
    assert_close(out, REF.paged_attention(q, ref_cache, meta, 0.25), torch.float32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(80, 2, 2), (32, 4, 2)])
def test_varlen_attention(causal, head_dim, heads, kv_heads):
    bounds = [0, 15, 31, 31, 48, 49]  # lens 15, 16, 0 (empty), 17, 1
    total = bounds[-1]
    q = torch.randn(total, heads, head_dim)
    k, v = torch.randn(total, kv_heads, head_dim), torch.randn(total, kv_heads, head_dim)
    cu = torch.tensor(bounds, dtype=torch.int32)
    out = triton_backend.TritonAttentionBackend().varlen_attention(q, k, v, cu, 17, 0.1, causal)
    ref = REF.varlen_attention(q, k, v, cu, 17, 0.1, causal)
    assert_close(out, ref, torch.float32)


def test_varlen_attention_bf16_strided_views():
    qkv = torch.randn(20, 3, 2, 80).to(torch.bfloat16)  # packed like a vision tower's qkv
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    out = triton_backend.TritonAttentionBackend().varlen_attention(q, k, v, cu, 13, 0.11)
    assert_close(out, REF.varlen_attention(q, k, v, cu, 13, 0.11), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    x = torch.randn(2, 5, 48).to(dtype)
    residual = torch.randn(2, 5, 48).to(dtype) if with_residual else None
    weight = torch.randn(48).to(dtype)
    out, new_res = triton_ops.rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = triton_ops.rms_norm_ref(x, weight, 1e-6, residual)
    assert out.shape == x.shape and out.dtype == ref_out.dtype
    assert_close(out, ref_out, dtype)
    assert_close(new_res, ref_res, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_and_mul(dtype):
    x = torch.randn(3, 4, 2 * 40).to(dtype)
    out = triton_ops.silu_and_mul(x)
    assert out.shape == (3, 4, 40)
    assert_close(out, triton_ops.silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # full and partial rotary
def test_rotary_in_place_on_packed_qkv_views(dtype, rotary_dim):
    tokens, heads, kv_heads, head_dim = 7, 3, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    angles = torch.randn(tokens, rotary_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    ref_q, ref_k = triton_ops.rotary_embedding_ref(q.clone(), k.clone(), cos, sin)
    triton_ops.rotary_embedding(q, k, cos, sin)
    assert_close(q, ref_q, dtype)
    assert_close(k, ref_k, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


def test_rotary_q_alone_when_k_is_empty():
    """The vision towers rotate one tensor: `k` with no tokens leaves only q rotated."""
    q = torch.randn(5, 3, 16)
    angles = torch.randn(5, 8)
    ref_q, _ = triton_ops.rotary_embedding_ref(q.clone(), q.clone(), angles.cos(), angles.sin())
    out_q, out_k = triton_ops.rotary_embedding(q, q[:0], angles.cos(), angles.sin())
    assert out_q is q and out_k.shape[0] == 0
    assert_close(q, ref_q, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_gemv(dtype, rows, split_k, with_bias, silu_mul):
    """N=37, K=83 in 16 x 32 tiles: a partial feature block and a partial last K tile; 3 K tiles
    -> split 2 gets 2 + 1 tiles, split 4 leaves one split empty (it must add zeros). Each call
    twice: the split-K arrival counters must be back at zero after a call. `silu_mul` takes
    `[gate | up]` rows and must equal `silu_and_mul` then the plain product."""
    gen = torch.Generator().manual_seed(10 * rows + split_k)
    x = torch.randn(rows, 83 * (1 + silu_mul), generator=gen).to(dtype)
    weight = (torch.randn(37, 83, generator=gen) / 83**0.5).to(dtype)
    bias = torch.randn(37, generator=gen).to(dtype) if with_bias else None
    config = gemv_ops.GemvConfig(block_n=16, block_k=32, split_k=split_k)
    rows_in = triton_ops.silu_and_mul_ref(x) if silu_mul else x
    ref = F.linear(rows_in.float(), weight.float(), None if bias is None else bias.float())
    for _ in range(2):
        out = gemv_ops.gemv(x, weight, bias, config, silu_mul=silu_mul)
        assert out.shape == (rows, 37) and out.dtype == dtype
        assert_close(out, ref, dtype)


def test_mlp_one_row_fuses_silu_into_the_down_gemv():
    """`MLP` with the GEMV set (as `enable_gemv` does on CUDA): one row takes gate_up, then
    down with SiLU*mul folded in; its output equals the unfused MLP's, and rows > 1 stay plain."""
    from polymodal.llm_core.config import ModelConfig  # noqa: F401  (MLP reads two fields)
    from polymodal.llm_core.models.llama import MLP

    class Cfg:
        hidden_size, intermediate_size = 48, 80

    mlp = MLP(Cfg())
    calls = []

    def traced_gemv(x, weight, bias=None, config=None, silu_mul=False, residual=None):
        calls.append(silu_mul)
        return gemv_ops.gemv(x, weight, bias, config, silu_mul=silu_mul, residual=residual)

    x = torch.randn(3, 48)
    plain = mlp(x)  # no GEMV: F.linear + silu_and_mul
    for layer in (mlp.gate_up_proj, mlp.down_proj):
        layer.gemv = traced_gemv
    assert_close(mlp(x[:1]), plain[:1], torch.float32)
    assert calls == [False, True]
    assert_close(mlp(x), plain, torch.float32)  # 3 rows > GEMV_MAX_ROWS: plain path
    assert calls == [False, True]


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_residual_then_deferred_norm(rows, split_k):
    """The add + RMSNorm between blocks folded into GEMVs (bf16): a GEMV given `residual`
    returns h = out + residual (rounded as torch adds) with per-block sums of h^2; a GEMV given
    `DeferredNorm(h)` equals F.linear of the reference RMSNorm of h."""
    from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(rows + 10 * split_k)
    x = torch.randn(rows, 83, generator=gen).to(dtype)
    w1 = (torch.randn(37, 83, generator=gen) / 83**0.5).to(dtype)
    residual = torch.randn(rows, 37, generator=gen).to(dtype)
    config = gemv_ops.GemvConfig(block_n=8, block_k=32, split_k=split_k)  # 5 feature blocks
    for _ in range(2):  # the split-K counters are reset
        added = gemv_ops.gemv(x, w1, None, config, residual=residual)
        assert isinstance(added, AddedResidual) and added.sumsq.shape == (rows, 5)
        out = F.linear(x.float(), w1.float()).to(dtype)
        assert_close(added.h, (out.float() + residual.float()).to(dtype), dtype)
        h = added.h.float()
        blocks = torch.stack([(h[:, i : i + 8] ** 2).sum(1) for i in range(0, 37, 8)], 1)
        torch.testing.assert_close(added.sumsq, blocks, rtol=1e-5, atol=1e-5)
    norm_w = (1 + 0.1 * torch.randn(37, generator=gen)).to(dtype)
    w2 = (torch.randn(29, 37, generator=gen) / 37**0.5).to(dtype)
    deferred = DeferredNorm(added.h, added.sumsq, norm_w, 1e-6)
    y = gemv_ops.gemv(deferred, w2, None, gemv_ops.GemvConfig(block_n=8, block_k=16))
    normed = triton_ops.rms_norm_ref(added.h, norm_w, 1e-6)[0]
    assert_close(y, F.linear(normed.float(), w2.float()), dtype)
    assert_close(deferred.materialize(), normed, dtype)


def test_decoder_one_row_folds_adds_and_norms_into_gemvs(tmp_path_factory):
    """Every decoder Linear on the GEMV (as `enable_gemv` sets it on CUDA): batch-1 decode
    steps add the residual in o_proj / down and normalize as qkv / gate_up load x, with no norm
    between layers (decode graphs' step, run eagerly here); the logits and tokens equal the
    plain model's."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.layers.linear import Linear
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits, tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "qwen2")  # q/k/v bias
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    runs = []
    for fused in (False, True):
        engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=16,
                        skip_tokenizer_init=True)  # fmt: skip
        calls = []

        def traced(x, weight, bias=None, config=None, silu_mul=False, residual=None, calls=calls):
            calls.append((type(x).__name__, silu_mul, residual is not None))
            return gemv_ops.gemv(x, weight, bias, config, silu_mul, residual)

        runner = engine.runner
        runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 1, 16, runner.uses_mrope)
        if fused:
            for module in runner.model.modules():
                if isinstance(module, Linear):
                    module.gemv = traced
        seen = record_logits(engine)
        rid = engine.add_request([5, 17, 42, 99, 3], params)
        runs.append((engine.run_until_done()[rid].outputs[0].token_ids, seen, calls))
    (tokens, seen, _), (fused_tokens, fused_seen, calls) = runs
    assert fused_tokens == tokens and len(fused_seen) == len(seen) == 4
    for got, ref in zip(fused_seen, seen):
        assert_close(got, ref, torch.float32)
    layers = len(engine.runner.model.model.layers)
    step = calls[-(4 * layers + 1) :]  # the last decode step: 4 GEMVs a layer + the LM head
    assert step[0] == ("Tensor", False, False)  # layer 0's qkv: its input norm ran plainly
    assert step[1:4] == [("Tensor", False, True), ("DeferredNorm", False, False),
                         ("Tensor", True, True)]  # fmt: skip
    assert step[4] == ("DeferredNorm", False, False)  # layer 1's qkv: no norm kernel before
    assert step[-1] == ("Tensor", False, False)  # LM head after the final norm (a kernel)


@pytest.mark.parametrize("rows,n,k", [(1, 300, 2000), (8, 300, 2000), (6, 130, 515), (1, 1, 5)])
def test_gemv_default_config(rows, n, k):
    """The heuristic's pick (8 stand-in SMs: the first two shapes split K) on fp16 views."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(rows, 2 * k, generator=gen).half()[:, ::2]  # strided rows: copied
    weight = (torch.randn(n, k, generator=gen) / k**0.5).half()
    bias = torch.randn(n, generator=gen).half()
    out = gemv_ops.gemv(x, weight, bias)
    assert_close(out, F.linear(x.float(), weight.float(), bias.float()), torch.float16)


def test_gemv_edge_cases():
    weight, bias = torch.randn(5, 7), torch.randn(5)
    assert gemv_ops.gemv(torch.randn(0, 7), weight).shape == (0, 5)
    empty_k = gemv_ops.gemv(torch.randn(2, 0), torch.randn(5, 0), bias)  # bias only
    assert torch.equal(empty_k, bias.expand(2, 5))
    with pytest.raises(ValueError, match="M <= 8"):
        gemv_ops.gemv(torch.randn(9, 7), weight)
    with pytest.raises(ValueError, match="one dtype"):
        gemv_ops.gemv(torch.randn(2, 7).half(), weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv_ops.gemv(torch.randn(2, 5), weight.t())
    with pytest.raises(ValueError, match="power of two"):
        gemv_ops.GemvConfig(block_n=24)


def test_gemv_default_config_heuristic():
    """Qwen2.5-VL-7B shapes on 132 SMs: one row takes the configs measured fastest; more rows
    ~4 programs per SM with 8192-element weight tiles, rows widening the feature block."""
    pick, Config = gemv_ops.default_config, gemv_ops.GemvConfig
    # one row: the configs measured fastest on an H200
    assert pick(1, 37888, 3584, 132) == Config(block_n=8, block_k=512)
    assert pick(1, 152064, 3584, 132) == Config(block_n=32, block_k=256, num_stages=3)
    down = Config(block_n=32, block_k=256, split_k=8, num_warps=8, num_stages=3)
    assert pick(1, 3584, 18944, 132) == down
    down_silu = Config(block_n=8, block_k=2048, split_k=4, num_warps=8, num_stages=3)
    assert pick(1, 3584, 18944, 132, silu_mul=True) == down_silu
    assert pick(1, 4608, 3584, 132) == Config(block_n=4, block_k=2048, num_warps=4)
    assert pick(1, 3584, 3584, 132) == Config(block_n=4, block_k=2048, num_warps=2)
    for n, k in [(4608, 3584), (3584, 3584), (3584, 18944)]:  # qkv, o_proj, down
        for rows in (2, 4, 8):
            cfg = pick(rows, n, k, 132)
            assert cfg.block_n >= 4 * rows, (rows, cfg)
            assert cfg.block_n * cfg.block_k == gemv_ops.TILE_ELEMENTS
            assert -(-n // cfg.block_n) * cfg.split_k >= 2 * 132, (n, k, rows, cfg)
            assert -(-k // cfg.block_k) >= 2 * cfg.split_k  # 2+ K tiles per split
    assert pick(1, 64, 40, 132) == gemv_ops.GemvConfig(block_n=4, block_k=64)  # K < tile


def test_resolve_ids():
    from polymodal.llm_core.cuda_graph import resolve_ids  # the torch path on CPU tensors

    gen = torch.Generator().manual_seed(5)
    for n in (1, 7, 1500):  # one program, a partial one, several
        ids = torch.randint(0, 1000, (n,), generator=gen)
        tokens = torch.randint(1000, 2000, (n + 3,), generator=gen)
        src = torch.randint(-1, n + 3, (n,), generator=gen)
        expected = resolve_ids(ids, src, tokens)
        assert torch.equal(triton_ops.resolve_ids(ids, src, tokens), expected)
    assert (expected >= 1000).any() and (expected < 1000).any()  # both kinds of rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_argmax(dtype):
    """Cast + argmax over 3 rows of 9000 (3 chunks, the last partial), ties broken to the first
    index as torch.argmax does: a tie inside a chunk and one across chunks."""
    gen = torch.Generator().manual_seed(3)
    raw = torch.randn(3, 9000, generator=gen).to(dtype)
    raw[1, [70, 90]] = 50.0  # tie inside chunk 0
    raw[2, [8500, 5000]] = 60.0  # tie across chunks 1 and 2
    out = torch.empty(3, 9000)
    tokens = torch.empty(3, dtype=torch.int64)
    for _ in range(2):  # the arrival counters are back at zero
        triton_ops.logits_argmax(raw, out, tokens)
        assert torch.equal(out, raw.float())
        assert tokens.tolist() == raw.float().argmax(-1).tolist()
    assert tokens.tolist()[1:] == [70, 5000]


def test_mrope_cos_sin_matches_the_torch_gather():
    from types import SimpleNamespace

    from polymodal.llm_core.layers.rotary import RotaryEmbedding

    cfg = SimpleNamespace(rope_theta=10000.0, rope_parameters=None)
    rotary = RotaryEmbedding(cfg, 32, 64, mrope_section=[4, 6, 6])
    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 64, (3, 11), generator=gen)
    cos, sin = triton_ops.mrope_cos_sin(rotary.cos_sin_cache, positions, rotary.mrope_section)
    ref_cos, ref_sin = rotary.cos_sin(positions)  # CPU tensors: the torch path
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
