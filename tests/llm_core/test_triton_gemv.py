"""The Triton GEMV (`layers/gemv.py`) against F.linear, and the decoder's one-row path that
folds SiLU, residual adds and RMSNorms into it, on CPU under TRITON_INTERPRET=1
(set up in `interpreted.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import gemv as gemv_ops
from polymodal.llm_core.layers import triton_ops
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)


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


def _one_row_folds(path):
    """Greedy decode of one prompt on `path` plainly, then with every decoder Linear on the GEMV
    (as `enable_gemv` sets it on CUDA; decode graphs' step, run eagerly here). Returns (plain
    tokens, fused tokens, plain logits, fused logits, the fused run's GEMV calls as (x's type,
    silu_mul, residual given, post_norm given), the model)."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.layers.linear import Linear
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    runs = []
    for fused in (False, True):
        engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=16,
                        skip_tokenizer_init=True)  # fmt: skip
        calls = []

        def traced(x, weight, bias=None, config=None, silu_mul=False, residual=None,
                   post_norm=None, gelu_tanh=False, calls=calls):  # fmt: skip
            calls.append((type(x).__name__, silu_mul, residual is not None, post_norm is not None))
            return gemv_ops.gemv(x, weight, bias, config, silu_mul, residual, post_norm=post_norm,
                                 gelu_tanh=gelu_tanh)  # fmt: skip

        runner = engine.runner
        runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 1, 16, runner.uses_mrope,
                                     runner.num_kv_groups)  # fmt: skip
        if fused:
            for module in runner.model.modules():
                if isinstance(module, Linear):
                    module.gemv = traced
        seen = record_logits(engine)
        rid = engine.add_request([5, 17, 42, 99, 3], params)
        runs.append((engine.run_until_done()[rid].outputs[0].token_ids, seen, calls))
    (tokens, seen, _), (fused_tokens, fused_seen, calls) = runs
    return tokens, fused_tokens, seen, fused_seen, calls, engine.runner.model


def test_decoder_one_row_folds_adds_and_norms_into_gemvs(tmp_path_factory):
    """Batch-1 decode steps add the residual in o_proj / down and normalize as qkv / gate_up
    load x, with no norm between layers; the logits and tokens equal the plain model's."""
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "qwen2")  # q/k/v bias
    tokens, fused_tokens, seen, fused_seen, calls, model = _one_row_folds(path)
    assert fused_tokens == tokens and len(fused_seen) == len(seen) == 4
    for got, ref in zip(fused_seen, seen):
        assert_close(got, ref, torch.float32)
    layers = len(model.model.layers)
    step = calls[-(4 * layers + 1) :]  # the last decode step: 4 GEMVs a layer + the LM head
    assert step[0] == ("Tensor", False, False, False)  # layer 0's qkv: its norm ran plainly
    assert step[1:4] == [("Tensor", False, True, False), ("DeferredNorm", False, False, False),
                         ("Tensor", True, True, False)]  # fmt: skip
    assert step[4] == ("DeferredNorm", False, False, False)  # layer 1's qkv: no norm kernel
    assert step[-1] == ("Tensor", False, False, False)  # LM head after the final norm (a kernel)


def test_gemma3_one_row_folds_sandwich_norms_into_gemvs(tmp_path_factory, monkeypatch):
    """Gemma 3 (sandwich norms) with `FOLD_GEMMA_EPILOGUES` (off by default: measured slower):
    o_proj and down do the post-norm and the add (`post_norm`), qkv and gate_up the next
    pre-norm as they load x (a unit-offset `DeferredNorm`), down the GELU-tanh * up: no norm
    or activation kernel between them; the logits and tokens equal the plain model's."""
    from polymodal.llm_core.layers import linear
    from tests.helpers import tiny_checkpoint

    monkeypatch.setattr(linear, "FOLD_GEMMA_EPILOGUES", True)
    path = tiny_checkpoint(tmp_path_factory, "gemma3")
    tokens, fused_tokens, seen, fused_seen, calls, model = _one_row_folds(path)
    assert fused_tokens == tokens and len(fused_seen) == len(seen) == 4
    for got, ref in zip(fused_seen, seen):
        assert_close(got, ref, torch.float32)
    layers = len(model.model.layers)
    step = calls[-(4 * layers + 1) :]
    assert step[0] == ("Tensor", False, False, False)  # layer 0's qkv: its norm ran plainly
    # o_proj folds post-norm + add; gate_up loads the pre-norm; down GELU-tanh * up as it
    # loads x, then post-norm + add
    assert step[1:4] == [("Tensor", False, True, True), ("DeferredNorm", False, False, False),
                         ("Tensor", True, True, True)]  # fmt: skip
    assert step[4] == ("DeferredNorm", False, False, False)  # layer 1's qkv
    assert step[-1] == ("Tensor", False, False, False)  # LM head after the final norm


@pytest.mark.parametrize("split_k,block_k", [(1, 32), (2, 32), (1, 128)])
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_post_norm_then_unit_deferred_norm(rows, split_k, block_k):
    """Gemma's sandwich boundary folded into GEMVs (bf16): a GEMV given `residual` and
    `post_norm` returns h = residual + post(out), bit for bit the new residual of the
    `sandwich_norm` kernel on the plain GEMV's output, with h's sums of squares; a GEMV given
    the unit-offset `DeferredNorm(h)` equals the GEMV of that kernel's normalized output. K in
    three tiles, or all of it in one (the one-row default up to `ONE_TILE_MAX_K`)."""
    from polymodal.llm_core.counters import arrival_counters
    from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm

    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(rows + 10 * split_k)
    x = torch.randn(rows, 83, generator=gen).to(dtype)
    w1 = (torch.randn(37, 83, generator=gen) / 83**0.5).to(dtype)
    residual = torch.randn(rows, 37, generator=gen).to(dtype)
    post_w, pre_w = ((0.5 * torch.randn(37, generator=gen)).to(dtype) for _ in range(2))
    config = gemv_ops.GemvConfig(block_n=8, block_k=block_k, split_k=split_k)  # 5 feature blocks
    y = gemv_ops.gemv(x, w1, None, config)
    ref_x, ref_h = triton_ops.sandwich_norm(y, residual, post_w, 1e-6, pre_w, 1e-5)
    for _ in range(2):  # the arrival counters are reset
        added = gemv_ops.gemv(x, w1, None, config, residual=residual, post_norm=(post_w, 1e-6))
        assert isinstance(added, AddedResidual) and added.sumsq.shape == (rows, 1)
        assert torch.equal(added.h, ref_h)
        torch.testing.assert_close(added.sumsq[:, 0], (ref_h.float() ** 2).sum(1))
        assert not arrival_counters(x.device, 6)[:6].any()
    w2 = (torch.randn(29, 37, generator=gen) / 37**0.5).to(dtype)
    deferred = DeferredNorm(added.h, added.sumsq, pre_w, 1e-5, unit_offset=True)
    config = gemv_ops.GemvConfig(block_n=8, block_k=16 if block_k == 32 else 64)
    out = gemv_ops.gemv(deferred, w2, None, config)
    assert_close(out, gemv_ops.gemv(ref_x, w2, None, config), dtype)
    assert_close(deferred.materialize(), ref_x, dtype)
    with pytest.raises(ValueError, match="post_norm needs a residual"):
        gemv_ops.gemv(x, w1, None, config, post_norm=(post_w, 1e-6))


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
    with pytest.raises(ValueError, match="of x.s dtype"):
        gemv_ops.gemv(torch.randn(2, 7).half(), weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv_ops.gemv(torch.randn(2, 5), weight.t())
    with pytest.raises(ValueError, match="power of two"):
        gemv_ops.GemvConfig(block_n=24)


def test_gemv_default_config_heuristic():
    """Qwen2.5-VL-7B shapes on 132 SMs: one row takes the configs measured fastest; more rows
    ~4 programs per SM with 8192-element weight tiles, rows widening the feature block."""
    pick, Config = gemv_ops.default_config, gemv_ops.GemvConfig
    # one row: K up to `ONE_TILE_MAX_K` one whole-K tile of 4 features (qkv, o, gate_up, the
    # LM head: an H100's decode); past it the tiles measured fastest on an H200
    one_tile = Config(block_n=4, block_k=4096)
    for n in (4608, 3584, 37888, 152064):
        assert pick(1, n, 3584, 132) == one_tile
    assert pick(1, 2048, 4096, 132) == one_tile  # Qwen3-30B-A3B's o
    assert pick(1, 5120, 2048, 132) == Config(block_n=4, block_k=2048)  # and its qkv
    assert pick(1, 152064, 5120, 132) == Config(block_n=32, block_k=256, num_stages=3)
    assert pick(1, 55296, 5120, 132) == Config(block_n=8, block_k=512)
    assert pick(1, 7168, 5120, 132) == Config(block_n=4, block_k=2048, num_warps=4)
    assert pick(1, 4096, 5120, 132) == Config(block_n=4, block_k=2048, num_warps=2)
    down = Config(block_n=32, block_k=256, split_k=8, num_warps=8, num_stages=3)
    assert pick(1, 3584, 18944, 132) == down
    down_silu = Config(block_n=8, block_k=2048, split_k=4, num_warps=8, num_stages=3)
    assert pick(1, 3584, 18944, 132, silu_mul=True) == down_silu
    for n, k in [(4608, 3584), (3584, 3584), (3584, 18944)]:  # qkv, o_proj, down
        for rows in (2, 4, 8):
            cfg = pick(rows, n, k, 132)
            assert cfg.block_n >= 4 * rows, (rows, cfg)
            assert cfg.block_n * cfg.block_k == gemv_ops.TILE_ELEMENTS
            assert -(-n // cfg.block_n) * cfg.split_k >= 2 * 132, (n, k, rows, cfg)
            assert -(-k // cfg.block_k) >= 2 * cfg.split_k  # 2+ K tiles per split
    assert pick(1, 64, 40, 132) == gemv_ops.GemvConfig(block_n=4, block_k=64)  # K < tile


def test_only_the_gemv_gets_a_unit_offset_deferred_norm():
    """A Gemma (unit-offset) `DeferredNorm` reaches the 16-bit GEMV as is (one row); any other
    method, and the plain path above the GEMV's rows, gets it normalized (`norm.plain`); a
    plain deferred norm still reaches methods that fold it."""
    from polymodal.llm_core.layers.linear import Linear, UnquantizedLinearMethod
    from polymodal.llm_core.layers.norm import DeferredNorm

    seen = []

    class Recording(UnquantizedLinearMethod):
        supports_gemv = False

        def apply(self, layer, x, silu_mul=False, residual=None):
            seen.append(x)
            return super().apply(layer, x.materialize() if isinstance(x, DeferredNorm) else x)

    torch.manual_seed(0)
    h = torch.randn(3, 24).bfloat16()
    weight = torch.randn(24).bfloat16()
    sumsq = (h.float() ** 2).sum(1, keepdim=True)
    unit = DeferredNorm(h, sumsq, weight, 1e-6, unit_offset=True)
    other = Linear(24, 8, bias=False, method=Recording()).bfloat16()
    other(unit)
    assert isinstance(seen[-1], torch.Tensor) and torch.equal(seen[-1], unit.materialize())
    other(DeferredNorm(h, sumsq, weight, 1e-6))
    assert isinstance(seen[-1], DeferredNorm)
    dense = Linear(24, 8, bias=False).bfloat16()
    dense.gemv = gemv_ops.gemv
    ref = F.linear(unit.materialize().float(), dense.weight.float())
    assert_close(dense(unit), ref, torch.bfloat16)  # 3 rows: normalized, then F.linear
    one = DeferredNorm(h[:1], sumsq[:1], weight, 1e-6, unit_offset=True)
    assert_close(dense(one), ref[:1], torch.bfloat16)  # the GEMV folds it


@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_gelu_tanh_mul_on_load(rows):
    """`silu_mul=True, gelu_tanh=True`: x is `[gate | up]` and the product uses
    gelu_tanh(gate) * up rounded as `silu_and_mul(gelu_tanh=True)` rounds (bf16)."""
    gen = torch.Generator().manual_seed(rows)
    gate_up = (2 * torch.randn(rows, 2 * 72, generator=gen)).bfloat16()
    weight = (torch.randn(24, 72, generator=gen) / 72**0.5).bfloat16()
    config = gemv_ops.GemvConfig(block_n=8, block_k=32, split_k=2)
    act = triton_ops.silu_and_mul(gate_up, gelu_tanh=True)
    got = gemv_ops.gemv(gate_up, weight, None, config, silu_mul=True, gelu_tanh=True)
    assert torch.equal(got, gemv_ops.gemv(act, weight, None, config))
    silu = gemv_ops.gemv(gate_up, weight, None, config, silu_mul=True)
    assert not torch.equal(got, silu)
    with pytest.raises(ValueError, match="activation of silu_mul"):
        gemv_ops.gemv(act, weight, None, config, gelu_tanh=True)


def test_gemma3_one_row_default_keeps_the_norm_kernels(tmp_path_factory):
    """By default (`FOLD_GEMMA_EPILOGUES` off, measured faster on an H200) Gemma 3's GEMVs get
    no post-norm and no GELU-tanh: `sandwich_norm` and the activation kernel run between them;
    the logits and tokens equal the plain model's."""
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "gemma3")
    tokens, fused_tokens, seen, fused_seen, calls, _ = _one_row_folds(path)
    assert fused_tokens == tokens
    for got, ref in zip(fused_seen, seen):
        assert_close(got, ref, torch.float32)
    assert calls and not any(post for *_, post in calls)  # no post-norm folded
    assert not any(silu for _, silu, *_ in calls)  # down takes GELU-tanh * up made before it
