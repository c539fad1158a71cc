"""The segmented multi-LoRA Triton kernels (split-K shrink + expand, and the GEMV's LoRA
epilogue) against the torch reference, on CPU under TRITON_INTERPRET=1 (`interpreted.py`, where
A tiles are 32 wide): packed slices, ranks below the padded rank, tokens without an adapter,
idle slots, more tokens than a block, K not a multiple of the chunk, x as the layer sees it
(deferred norm, SiLU*mul), and the grid sized for a padded (graph-bucket) token count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import gemv as gemv_ops
from polymodal.llm_core.layers import gemv_lora
from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm, rms_norm_torch
from polymodal.llm_core.layers.triton_ops import silu_and_mul_ref
from polymodal.llm_core.lora import launch_plan, triton_lora
from polymodal.llm_core.lora.layer import LoRABatch
from polymodal.llm_core.lora.ops import lora_reference, lora_triton
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

CASES = {  # name: (in, slice sizes, max_rank, slots, per-request (slot, tokens))
    # K = 83: three chunks of 32, 32, 19
    "qkv_packed_mixed": (83, [64, 32, 32], 16, 3, [(0, 5), (-1, 3), (2, 1), (0, 1), (1, 7)]),
    "plain_decode": (48, [80], 8, 2, [(1, 1), (0, 1), (-1, 1), (1, 1)]),
    "gate_up_long": (32, [96, 96], 16, 2, [(1, 37), (-1, 4), (0, 2)]),
    "idle_slots": (64, [64], 32, 4, [(3, 6), (-1, 2)]),
    "no_adapter_tokens": (32, [32], 16, 2, [(-1, 9)]),
}


def _weights(in_features, sizes, rank, slots, dtype, seed=0):
    """Random A/B with each slot's rank below the padded rank (the padding stays zero)."""
    gen = torch.Generator().manual_seed(seed)
    out = sum(sizes)
    lora_a = torch.zeros(slots, len(sizes) * rank, in_features)
    lora_b = torch.zeros(slots, out, rank)
    for slot in range(slots):
        r = max(1, rank - 3 * slot)
        for s in range(len(sizes)):
            lora_a[slot, s * rank : s * rank + r] = torch.randn(r, in_features, generator=gen)
        lora_b[slot, :, :r] = torch.randn(out, r, generator=gen) * 0.1
    return lora_a.to(dtype), lora_b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_shrink_expand_equal_the_reference(case, dtype):
    in_features, sizes, rank, slots, requests = CASES[case]
    lora_a, lora_b = _weights(in_features, sizes, rank, slots, dtype)
    num_tokens = sum(n for _, n in requests)
    padded = num_tokens + 5  # a graph bucket: padding rows belong to no adapter
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(padded, in_features, generator=gen).to(dtype)
    base = torch.randn(padded, sum(sizes), generator=gen).to(dtype)
    batch = LoRABatch(slots, 64, "cpu")
    batch.use_triton = True
    batch.set_step(requests)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    slices = list(zip(offsets, sizes))
    expected = lora_reference(
        x, base.clone(), lora_a, lora_b, slices, rank, batch.segments.host_groups
    )
    out = lora_triton(
        x, base.clone(), lora_a, lora_b, torch.tensor(offsets, dtype=torch.int32),
        torch.tensor(sizes, dtype=torch.int32), max(sizes), rank, batch.segments,
    )  # fmt: skip
    assert_close(out, expected, dtype)
    untouched = [t for t, slot in enumerate(_token_slots(requests, padded)) if slot < 0]
    assert torch.equal(out[untouched], base[untouched])  # no adapter: rows left as they were


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in CASES if any(slot >= 0 for slot, _ in CASES[c][4])])
def test_folded_expand_equals_the_reference(case, dtype):  # (a step of no adapter: base method)
    """The shrink inside the base GEMM (`x @ [W; A]^T`), then `expand_folded`: equal to the
    torch math of the same (`lora_folded_reference`), and in fp32 to the unfolded reference;
    rows without an adapter and a bucket's padding rows get the base columns exactly, in a
    fresh contiguous output."""
    from polymodal.llm_core.lora import triton_fold
    from polymodal.llm_core.lora.ops import lora_folded_reference

    in_features, sizes, rank, slots, requests = CASES[case]
    lora_a, lora_b = _weights(in_features, sizes, rank, slots, dtype)
    num_tokens, out_features = sum(n for _, n in requests), sum(sizes)
    padded = num_tokens + 5
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(padded, in_features, generator=gen).to(dtype)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.2).to(dtype)
    stacked = F.linear(x, torch.cat([weight, lora_a.flatten(0, 1)]))  # [T, out + L * S * R]
    batch = _step(slots, requests)
    batch.set_step([(0, padded)])  # an earlier, longer step: its rows are reset
    batch.set_step(requests)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    slices, groups = list(zip(offsets, sizes)), batch.segments.host_groups
    expected = lora_folded_reference(stacked, out_features, lora_b, slices, rank, groups)
    if dtype == torch.float32:
        plain = lora_reference(x, F.linear(x, weight), lora_a, lora_b, slices, rank, groups)
        torch.testing.assert_close(expected, plain, atol=1e-4, rtol=1e-4)
    out = triton_fold.expand_folded(
        stacked, lora_b, out_features, torch.tensor(offsets, dtype=torch.int32),
        torch.tensor(sizes, dtype=torch.int32), max(sizes), rank, batch.segments,
    )  # fmt: skip
    assert out.shape == (padded, out_features) and out.is_contiguous()
    assert_close(out, expected, dtype)
    untouched = [t for t, slot in enumerate(_token_slots(requests, padded)) if slot < 0]
    assert torch.equal(out[untouched], stacked[untouched, :out_features])


def _step(slots, requests):
    batch = LoRABatch(slots, 64, "cpu")
    batch.use_triton = True
    batch.set_step(requests)
    return batch


@pytest.mark.parametrize("form", ["deferred_norm", "silu_mul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shrink_reads_x_as_the_layer_does(form, dtype):
    """x given as the GEMV takes it: a `DeferredNorm` (sums of squares in 3 parts) normalized
    as it loads, or `[gate | up]` activated as it loads; equal to the reference on the
    materialized input (norm / SiLU rounded as the unfused kernels round; half, not bf16: the
    interpreter truncates bf16, which biases every normalized element the same way)."""
    in_features, sizes, rank, slots, requests = 83, [40, 9, 8], 16, 3, CASES["qkv_packed_mixed"][4]
    lora_a, lora_b = _weights(in_features, sizes, rank, slots, dtype, seed=3)
    num_tokens = sum(n for _, n in requests)
    gen = torch.Generator().manual_seed(4)
    if form == "silu_mul":
        x = torch.randn(num_tokens, 2 * in_features, generator=gen).to(dtype)
        plain = silu_and_mul_ref(x)
    else:
        h = torch.randn(num_tokens, in_features, generator=gen).to(dtype)
        weight = (1 + 0.1 * torch.randn(in_features, generator=gen)).to(dtype)
        squares = h.float() ** 2
        sumsq = torch.stack([squares[:, :30].sum(1), squares[:, 30:60].sum(1),
                             squares[:, 60:].sum(1)], 1)  # fmt: skip
        x = DeferredNorm(h, sumsq, weight, 1e-6)
        plain = rms_norm_torch(h, weight, 1e-6)[0]
    base = torch.randn(num_tokens, sum(sizes), generator=gen).to(dtype)
    batch = _step(slots, requests)
    offsets = [0, 40, 49]
    expected = lora_reference(plain, base.clone(), lora_a, lora_b, list(zip(offsets, sizes)),
                              rank, batch.segments.host_groups)  # fmt: skip
    out = lora_triton(
        x, base.clone(), lora_a, lora_b, torch.tensor(offsets, dtype=torch.int32),
        torch.tensor(sizes, dtype=torch.int32), max(sizes), rank, batch.segments,
        silu_mul=form == "silu_mul",
    )  # fmt: skip
    assert_close(out, expected, dtype)


def test_split_plan_spreads_k_over_the_sms(monkeypatch):
    """Compiled-GPU plan (132 SMs): chunks of whole 128-wide tiles covering K exactly once (the
    last one partial), about 4 busy programs an SM over the step's tiles, at most MAX_SPLITS
    chunks; the 7B's K values at one token and at 64 (4 token blocks); prefill: one chunk."""
    monkeypatch.setattr(launch_plan, "interpreted", lambda: False)
    for k in [1, 100, 128, 300, 3584, 4096, 8192, 8193, 18944, 29568, 100_000]:
        for work in [1, 4, 64, 10_000]:
            block_k, chunk, splits = launch_plan.split_plan(k, work, 132)
            assert block_k == 128 and chunk % block_k == 0, k
            assert splits <= launch_plan.MAX_SPLITS and (splits - 1) * chunk < k <= splits * chunk
    assert launch_plan.split_plan(18944, 1, 132) == (128, 128, 148)  # one tile a program
    assert launch_plan.split_plan(18944, 4, 132) == (128, 256, 74)
    assert launch_plan.split_plan(3584, 4, 132) == (128, 128, 28)
    assert launch_plan.split_plan(3584, 1000, 132) == (128, 3584, 1)


@pytest.mark.parametrize("fma_rows", [0, 8])
@pytest.mark.parametrize("expand_cfg", [None, (16, 1), (32, 2)])
def test_launch_configs_equal_the_reference(fma_rows, expand_cfg):
    """Every launch knob gives the same result (bf16): the shrink's tl.dot and multiply-and-sum
    paths (a 4-token step), expand's feature blocks narrower than a slice and its programs
    walking several token blocks of their slot (one adapter's 20 tokens: two 16-token blocks)."""
    dtype, k_in, sizes, rank = torch.bfloat16, 83, [40, 9, 8], 16
    lora_a, lora_b = _weights(k_in, sizes, rank, 3, dtype, seed=8)
    gen = torch.Generator().manual_seed(9)
    shrink_cfg = launch_plan.ShrinkConfig(fma_rows=fma_rows)
    small = [(2, 2), (-1, 1), (0, 1)]  # 4 tokens
    x = torch.randn(4, k_in, generator=gen).to(dtype)
    y = triton_lora.shrink(x, lora_a, _step(3, small).segments, config=shrink_cfg)
    for t, slot in [(0, 2), (1, 2), (3, 0)]:
        want = x[t].float() @ lora_a[slot].float().T
        torch.testing.assert_close(y[t], want, atol=1e-4, rtol=1e-4)
    requests = [(2, 3), (-1, 2), (0, 20), (1, 1)]
    num_tokens = sum(n for _, n in requests)
    x = torch.randn(num_tokens, k_in, generator=gen).to(dtype)
    base = torch.randn(num_tokens, sum(sizes), generator=gen).to(dtype)
    batch = _step(3, requests)
    offsets = [0, 40, 49]
    expected = lora_reference(x, base.clone(), lora_a, lora_b, list(zip(offsets, sizes)), rank,
                              batch.segments.host_groups)  # fmt: skip
    y = triton_lora.shrink(x, lora_a, batch.segments, config=shrink_cfg)
    config = None
    if expand_cfg is not None:
        config = launch_plan.ExpandConfig(block_n=expand_cfg[0], token_programs=expand_cfg[1])
    out = base.clone()
    triton_lora.expand(y, lora_b, out, torch.tensor(offsets, dtype=torch.int32),
                       torch.tensor(sizes, dtype=torch.int32), max(sizes), rank, batch.segments,
                       config)  # fmt: skip
    assert_close(out, expected, dtype)
    assert torch.equal(out[3:5], base[3:5])


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("rows,slots", [(1, [1]), (1, [-1]), (3, [-1, 2, 0])])
@pytest.mark.parametrize("form", ["plain", "deferred_norm", "silu_mul"])
def test_gemv_adds_the_lora_term_before_the_residual(form, rows, slots, split_k):
    """The GEMV's LoRA epilogue (bf16): each row's term from the shrink's y and its slot's B
    (slices of 20 / 9 / 8 features in 8-wide blocks: blocks straddle slices), added to the
    rounded product before the residual, rounded in that order; sums of squares of the result
    per block. Rows without a slot get no term."""
    dtype, k_in, sizes, rank = torch.bfloat16, 83, [20, 9, 8], 8
    lora_a, lora_b = _weights(k_in, sizes, rank, 3, dtype, seed=5)
    gen = torch.Generator().manual_seed(6 + rows)
    width = 2 * k_in if form == "silu_mul" else k_in
    x = torch.randn(rows, width, generator=gen).to(dtype)
    plain = silu_and_mul_ref(x) if form == "silu_mul" else x
    if form == "deferred_norm":
        norm_w = (1 + 0.1 * torch.randn(k_in, generator=gen)).to(dtype)
        x = DeferredNorm(x, (x.float() ** 2).sum(1, keepdim=True), norm_w, 1e-6)
        plain = rms_norm_torch(x.h, norm_w, 1e-6)[0]
    weight = (torch.randn(37, k_in, generator=gen) / k_in**0.5).to(dtype)
    residual = torch.randn(rows, 37, generator=gen).to(dtype)
    batch = _step(3, [(slot, 1) for slot in slots])
    offsets = [0, 20, 29]
    y = triton_lora.shrink(x, lora_a, batch.segments, silu_mul=form == "silu_mul")
    delta = gemv_lora.LoRADelta(y, lora_b, batch.segments.token_slot,
                               torch.tensor(offsets, dtype=torch.int32))  # fmt: skip
    config = gemv_ops.GemvConfig(block_n=8, block_k=32, split_k=split_k)
    ref = F.linear(plain.float(), weight.float()).to(dtype)
    ref = lora_reference(plain, ref, lora_a, lora_b, list(zip(offsets, sizes)), rank,
                         batch.segments.host_groups)  # fmt: skip
    for _ in range(2):  # the split-K counters are reset
        added = gemv_ops.gemv(x, weight, None, config, silu_mul=form == "silu_mul",
                              residual=residual, lora=delta)  # fmt: skip
        assert isinstance(added, AddedResidual)
        assert_close(added.h, (ref.float() + residual.float()).to(dtype), dtype)
        h = added.h.float()
        blocks = torch.stack([(h[:, i : i + 8] ** 2).sum(1) for i in range(0, 37, 8)], 1)
        torch.testing.assert_close(added.sumsq, blocks, rtol=1e-5, atol=1e-5)
    out = gemv_ops.gemv(x, weight, None, config, silu_mul=form == "silu_mul", lora=delta)
    assert_close(out, ref, dtype)
    no_adapter = [m for m, slot in enumerate(slots) if slot < 0]
    plain_out = gemv_ops.gemv(x, weight, None, config, silu_mul=form == "silu_mul")
    assert torch.equal(out[no_adapter], plain_out[no_adapter])


def _token_slots(requests, padded):
    slots = [slot for slot, n in requests for _ in range(n)]
    return slots + [-1] * (padded - len(slots))


def test_segments_group_tokens_by_slot():
    batch = LoRABatch(3, 32, "cpu")
    batch.use_triton = True
    batch.set_step([(2, 2), (-1, 3), (0, 1), (2, 1)])
    seg = batch.segments
    # then the tokens without an adapter (2, 3, 4), and every row after the step's in order
    assert seg.seg_len.tolist() == [1, 0, 3, 3] and seg.seg_start.tolist() == [0, 1, 1, 4]
    assert seg.sorted_tokens[:9].tolist() == [5, 0, 1, 6, 2, 3, 4, 7, 8]
    assert [(s, t.tolist()) for s, t in seg.host_groups] == [(0, [5]), (2, [0, 1, 6])]
    assert seg.token_slot[:8].tolist() == [2, 2, -1, -1, -1, 0, 2, -1]
    assert batch.num_active == 2
    batch.set_step([(-1, 2)])  # no adapter token: nothing uploaded, nothing read
    assert batch.num_active == 0 and seg.host_groups == []
    batch.set_step([(1, 2)])  # rows the step before last set are reset
    assert seg.token_slot[:8].tolist() == [1, 1, -1, -1, -1, -1, -1, -1]
    assert seg.sorted_tokens[:9].tolist() == list(range(9))
    assert seg.seg_len.tolist() == [0, 2, 0, 0] and seg.seg_start.tolist() == [0, 0, 2, 2]
    batch.set_step([(-1, 1), (0, 1)])
    batch.clear()  # before a capture: the device buffers hold no token either
    assert seg.seg_len.tolist() == [0] * 4 and seg.seg_start.tolist() == [0] * 4
    assert seg.token_slot[:2].tolist() == [-1, -1] and seg.sorted_tokens[:3].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="33 tokens exceed"):
        batch.set_step([(0, 33)])


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory):
    pytest.importorskip("peft")
    from tests.helpers import tiny_checkpoint
    from tests.llm_core.lora_adapters import make_adapters

    base = tiny_checkpoint(tmp_path_factory, "llama")
    return base, make_adapters(base, tmp_path_factory.mktemp("lora_kernels"))


def _run_engine(engine, prompts, loras, max_tokens=4):
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits_by_request

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    seen = record_logits_by_request(engine)
    ids = [engine.add_request(p, params, lora_request=lo) for p, lo in zip(prompts, loras)]
    final = engine.run_until_done()
    return [(final[i].outputs[0].token_ids, seen[i]) for i in ids]


def _assert_merged(base, adapters, prompts, names, got, opts, max_tokens=4):
    from polymodal.llm_core.engine import Engine

    for prompt, name, (tokens, logits) in zip(prompts, names, got):
        merged = base if name is None else adapters[name][1]
        engine = Engine(str(merged), **opts)
        ref_tokens, ref_logits = _run_engine(engine, [prompt], [None], max_tokens)[0]
        assert tokens == ref_tokens, name
        for row, ref in zip(logits, ref_logits):
            assert (row - ref).abs().max().item() <= 1e-4, name


OPTS = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 32}


def test_engine_on_the_kernels_equals_merged_weights(llama_lora):
    """The whole engine path with the LoRA layers on the Triton kernels (interpreted): mixed
    adapters in one batch give the merged checkpoints' greedy tokens and logits."""
    from polymodal import LoRARequest
    from polymodal.llm_core.engine import Engine

    base, adapters = llama_lora
    names = ["all", None, "qv_down", "all"]
    prompts = [[5, 9, 33, 70, 11], [7, 7, 8], list(range(100, 121)), [12, 13]]
    engine = Engine(str(base), enable_lora=True, max_loras=2, **OPTS)
    engine.runner.lora.batch.use_triton = True
    loras = [None if n is None else LoRARequest(n, 1 + (n == "qv_down"), str(adapters[n][0]))
             for n in names]  # fmt: skip
    _assert_merged(base, adapters, prompts, names, _run_engine(engine, prompts, loras), OPTS)


def test_one_row_decode_keeps_the_gemv_folds_with_an_adapter(llama_lora):
    """Batch-1 decode with an adapter, every Linear on the GEMV (as `enable_gemv` sets it on
    CUDA): qkv / gate_up still normalize x as they load it and o_proj / down still add the
    residual, each with its LoRA term in the epilogue; tokens and logits equal the merged
    checkpoint's."""
    from polymodal import LoRARequest
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.layers.linear import Linear

    base, adapters = llama_lora
    engine = Engine(str(base), enable_lora=True, max_loras=1, **OPTS)
    engine.runner.lora.batch.use_triton = True
    calls = []

    def traced(x, weight, bias=None, config=None, silu_mul=False, residual=None, lora=None):
        calls.append((type(x).__name__, silu_mul, residual is not None, lora is not None))
        return gemv_ops.gemv(x, weight, bias, config, silu_mul, residual, lora)

    for module in engine.runner.model.modules():
        if isinstance(module, Linear):
            module.gemv = traced
    prompt = [[5, 9, 33, 70, 11]]
    got = _run_engine(engine, prompt, [LoRARequest("all", 1, str(adapters["all"][0]))], 3)
    _assert_merged(base, adapters, prompt, ["all"], got, OPTS, 3)
    layers = len(engine.runner.model.model.layers)
    step = calls[-(4 * layers + 1) :]  # the last decode step: 4 GEMVs a layer + the LM head
    qkv, o_proj = ("DeferredNorm", False, False, True), ("Tensor", False, True, True)
    gate_up, down = ("DeferredNorm", False, False, True), ("Tensor", True, True, True)
    assert step[4:8] == [qkv, o_proj, gate_up, down]  # layer 1: no norm kernel before it
    assert step[-1] == ("Tensor", False, False, False)  # the LM head takes no adapter
