"""Multi-LoRA on CUDA: the Triton kernels inside captured decode and prefill graphs. Mixed
adapters in one batch (fp32) give what each request gives alone on PEFT's merged checkpoint;
in bf16 a mixed batch gives each request's tokens of a batch of its own adapter only. Steps
without adapter tokens replay the graphs captured without LoRA (the plain engine's). The
kernels at Qwen2.5-VL-7B's layer shapes (split-K shrink, expand, the one-row GEMV's LoRA
epilogue, the shrink folded into the base GEMM with its expand) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from polymodal import LoRARequest
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits_by_request, tiny_checkpoint

pytestmark = pytest.mark.gpu
pytest.importorskip("peft")

PROMPTS = [[5, 9, 33, 70, 11], [7, 7, 8], list(range(100, 140)), [12, 13], [40] * 20]
NAMES = ["all", None, "qv_down", "rslora_mlp", "all"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.llm_core.lora_adapters import make_adapters

    base = tiny_checkpoint(tmp_path_factory, "llama")
    return base, make_adapters(base, tmp_path_factory.mktemp("lora_gpu"))


def _loras(adapters, names):
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    return [None if n is None else LoRARequest(n, ids[n], str(adapters[n][0])) for n in names]


def _run(engine, prompts, loras):
    seen = record_logits_by_request(engine)
    ids = [engine.add_request(p, PARAMS, lora_request=lo) for p, lo in zip(prompts, loras)]
    final = engine.run_until_done()
    return [(final[i].outputs[0].token_ids, seen[i]) for i in ids]


def test_mixed_batch_in_graphs_equals_merged_fp32(setup):
    base, adapters = setup
    opts = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 64, "max_num_seqs": 8}
    engine = Engine(str(base), enable_lora=True, max_loras=2, **opts)
    assert engine.runner.graphs is not None and engine.runner.lora.batch.use_triton
    batched = _run(engine, PROMPTS, _loras(adapters, NAMES))
    assert engine.runner.graphs.lora_runs > 0  # decode steps replayed graphs with the kernels in
    for prompt, name, (tokens, logits) in zip(PROMPTS, NAMES, batched):
        merged = base if name is None else adapters[name][1]
        ref_tokens, ref_logits = _run(Engine(str(merged), **opts), [prompt], [None])[0]
        assert tokens == ref_tokens, name
        for row, ref in zip(logits, ref_logits):
            assert (row - ref).abs().max().item() <= 1e-3, name
    torch.cuda.synchronize()


def test_mixed_batch_bf16_equals_single_adapter_batches(setup):
    base, adapters = setup
    opts = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 64, "max_num_seqs": 8}
    engine = Engine(str(base), enable_lora=True, max_loras=3, **opts)
    assert all(layer.method.folded for layer in engine.runner.lora.layers.values())
    mixed = _run(engine, PROMPTS, _loras(adapters, NAMES))  # 5 rows: the folded GEMM + expand
    for prompt, name, (tokens, _) in zip(PROMPTS, NAMES, mixed):
        alone = _run(engine, [prompt], _loras(adapters, [name]))[0]
        assert tokens == alone[0], name


def test_steps_without_adapters_replay_the_plain_graphs(setup):
    """Both graph sets are captured; a batch without adapters replays the plain set only and
    equals the plain engine; a batch-1 decode with an adapter (the GEMV's LoRA epilogue, in
    the LoRA set) equals the same engine without the GEMV (the shrink folded into the cuBLAS
    GEMM, then `expand_folded`) in fp16."""
    base, adapters = setup
    opts = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 64, "max_num_seqs": 8}
    engine = Engine(str(base), enable_lora=True, max_loras=2, **opts)
    graphs, prefill = engine.runner.graphs, engine.runner.prefill_graphs
    assert set(graphs.graphs) == {False, True} and set(prefill.graphs) == {False, True}
    plain = _run(Engine(str(base), **opts), PROMPTS, [None] * len(PROMPTS))
    got = _run(engine, PROMPTS, [None] * len(PROMPTS))
    assert graphs.runs > 0 and graphs.lora_runs == 0 and prefill.lora_runs == 0
    for (tokens, logits), (ref_tokens, ref_logits) in zip(got, plain):
        assert tokens == ref_tokens
        for row, ref in zip(logits, ref_logits):
            assert (row - ref).abs().max().item() <= 1e-5
    half = {**opts, "dtype": "float16"}
    lora = _loras(adapters, ["all"])
    runs = []
    for gemv in (True, False):
        one = Engine(str(base), enable_lora=True, decode_gemv=gemv, **half)
        runs.append(_run(one, PROMPTS[:1], lora)[0])
        graphs = one.runner.graphs
        assert graphs.lora_runs > 0 and graphs.lora_runs == graphs.runs  # every decode step
    (tokens, logits), (ref_tokens, ref_logits) = runs
    assert tokens == ref_tokens
    for row, ref in zip(logits, ref_logits):
        assert (row - ref).abs().max().item() <= 2e-2


QWEN_7B = {  # layer: (in features, out slices)
    "qkv": (3584, [3584, 512, 512]),
    "o_proj": (3584, [3584]),
    "gate_up": (3584, [18944, 18944]),
    "down": (18944, [3584]),
}


def _lora_weights(in_features, sizes, rank, slots, gen):
    """bf16 adapters of unit-scale products: A ~ N(0, 1/in), B ~ N(0, 1/rank)."""
    a = torch.randn(slots, len(sizes) * rank, in_features, generator=gen) * in_features**-0.5
    b = torch.randn(slots, sum(sizes), rank, generator=gen) * rank**-0.5
    return a.to("cuda", torch.bfloat16), b.to("cuda", torch.bfloat16)


@pytest.mark.parametrize("layer", list(QWEN_7B))
@pytest.mark.parametrize("batch", [1, 64])
def test_kernels_at_real_sizes(layer, batch):
    """Rank 16, 4 slots: B tokens round robin over the 4 adapters and none (B = 1: one adapter
    token), padded to a 96-row bucket; the split-K shrink + expand equal the reference."""
    from polymodal.llm_core.lora.layer import LoRABatch
    from polymodal.llm_core.lora.ops import lora_reference, lora_triton

    in_features, sizes, rank, slots = *QWEN_7B[layer], 16, 4
    gen = torch.Generator().manual_seed(batch)
    lora_a, lora_b = _lora_weights(in_features, sizes, rank, slots, gen)
    requests = [(0, 1)] if batch == 1 else [(i % 5 - 1, 1) for i in range(batch)]
    lora_batch = LoRABatch(slots, 128, "cuda")
    lora_batch.set_step(requests)
    x = torch.randn(96, in_features, generator=gen).to("cuda", torch.bfloat16)
    base = torch.randn(96, sum(sizes), generator=gen).to("cuda", torch.bfloat16)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    groups = lora_batch.segments.host_groups
    expected = lora_reference(x, base.clone(), lora_a, lora_b, list(zip(offsets, sizes)), rank,
                              groups)  # fmt: skip
    out = lora_triton(
        x, base.clone(), lora_a, lora_b, torch.tensor(offsets, dtype=torch.int32, device="cuda"),
        torch.tensor(sizes, dtype=torch.int32, device="cuda"), max(sizes), rank,
        lora_batch.segments,
    )  # fmt: skip
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=2e-2)
    untouched = [t for t, (slot, _) in enumerate(requests) if slot < 0] + list(range(batch, 96))
    assert torch.equal(out[untouched], base[untouched])


@pytest.mark.parametrize("layer", list(QWEN_7B))
def test_folded_gemm_and_expand_at_real_sizes(layer):
    """The dense path above the GEMV's rows: one cuBLAS GEMM of `[W; A of 4 slots]` and
    `expand_folded`, 64 tokens round robin over the 4 adapters and none in a 96-row bucket,
    equal to the unfolded reference (bf16 y, as `expand` rounds it); rows without an adapter
    get the base product's columns exactly."""
    import torch.nn.functional as F

    from polymodal.llm_core.lora import triton_fold
    from polymodal.llm_core.lora.layer import LoRABatch
    from polymodal.llm_core.lora.ops import lora_folded_reference, lora_reference

    in_features, sizes, rank, slots = *QWEN_7B[layer], 16, 4
    gen = torch.Generator().manual_seed(5)
    lora_a, lora_b = _lora_weights(in_features, sizes, rank, slots, gen)
    weight = (torch.randn(sum(sizes), in_features, generator=gen) * in_features**-0.5).to(
        "cuda", torch.bfloat16
    )
    requests = [(i % 5 - 1, 1) for i in range(64)]
    lora_batch = LoRABatch(slots, 128, "cuda")
    lora_batch.set_step(requests)
    x = torch.randn(96, in_features, generator=gen).to("cuda", torch.bfloat16)
    stacked = F.linear(x, torch.cat([weight, lora_a.flatten(0, 1)]))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    slices, groups = list(zip(offsets, sizes)), lora_batch.segments.host_groups
    out = triton_fold.expand_folded(
        stacked, lora_b, sum(sizes), torch.tensor(offsets, dtype=torch.int32, device="cuda"),
        torch.tensor(sizes, dtype=torch.int32, device="cuda"), max(sizes), rank,
        lora_batch.segments,
    )  # fmt: skip
    folded = lora_folded_reference(stacked, sum(sizes), lora_b, slices, rank, groups)
    torch.testing.assert_close(out.float(), folded.float(), atol=1e-2, rtol=1e-2)
    plain = lora_reference(x, F.linear(x, weight), lora_a, lora_b, slices, rank, groups)
    torch.testing.assert_close(out.float(), plain.float(), atol=3e-2, rtol=2e-2)
    untouched = [t for t, (slot, _) in enumerate(requests) if slot < 0] + list(range(64, 96))
    assert torch.equal(out[untouched], stacked[untouched, : sum(sizes)])


@pytest.mark.parametrize("layer", list(QWEN_7B))
def test_one_row_gemv_lora_epilogue_at_real_sizes(layer):
    """Batch-1 decode's fused layer at the 7B's shapes (bf16, the default GEMV configs, split K
    for down): x normalized as it loads (SiLU*mul for down), the LoRA term, then the residual;
    equal to the unfused reference."""
    from polymodal.llm_core.layers import gemv as gemv_ops
    from polymodal.llm_core.layers import gemv_lora
    from polymodal.llm_core.layers.norm import DeferredNorm, rms_norm_torch
    from polymodal.llm_core.layers.triton_ops import silu_and_mul_ref
    from polymodal.llm_core.lora import triton_lora
    from polymodal.llm_core.lora.layer import LoRABatch
    from polymodal.llm_core.lora.ops import lora_reference

    in_features, sizes, rank = *QWEN_7B[layer], 16
    gen = torch.Generator().manual_seed(7)
    lora_a, lora_b = _lora_weights(in_features, sizes, rank, 4, gen)
    silu = layer == "down"
    x = torch.randn(1, in_features * (1 + silu), generator=gen).to("cuda", torch.bfloat16)
    if silu:
        plain = silu_and_mul_ref(x)
    else:
        norm_w = (1 + 0.1 * torch.randn(in_features, generator=gen)).to("cuda", torch.bfloat16)
        x = DeferredNorm(x, (x.float() ** 2).sum(1, keepdim=True), norm_w, 1e-6)
        plain = rms_norm_torch(x.h, norm_w, 1e-6)[0]
    out_features = sum(sizes)
    weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    weight = weight.to("cuda", torch.bfloat16)
    residual = torch.randn(1, out_features, generator=gen).to("cuda", torch.bfloat16)
    lora_batch = LoRABatch(4, 8, "cuda")
    lora_batch.set_step([(2, 1)])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    y = triton_lora.shrink(x, lora_a, lora_batch.segments, silu_mul=silu)
    delta = gemv_lora.LoRADelta(y, lora_b, lora_batch.segments.token_slot,
                               torch.tensor(offsets, dtype=torch.int32, device="cuda"))  # fmt: skip
    added = gemv_ops.gemv(x, weight, silu_mul=silu, residual=residual, lora=delta)
    ref = torch.nn.functional.linear(plain, weight)
    ref = lora_reference(plain, ref, lora_a, lora_b, list(zip(offsets, sizes)), rank,
                         lora_batch.segments.host_groups)  # fmt: skip
    torch.testing.assert_close(added.h.float(), (ref + residual).float(), atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("layer", ["qkv", "down"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("knobs", ["tl_dot_few_chunks", "walk_wide"])
def test_launch_configs_at_real_sizes(layer, batch, knobs):
    """Other points of the bench's sweep give the reference too (compiled): tl.dot for one
    token and 4-tile K chunks; or 256-wide expand blocks walking each slot's token blocks."""
    from polymodal.llm_core.lora import launch_plan, triton_lora
    from polymodal.llm_core.lora.layer import LoRABatch
    from polymodal.llm_core.lora.ops import lora_reference

    in_features, sizes, rank, slots = *QWEN_7B[layer], 16, 4
    gen = torch.Generator().manual_seed(11)
    lora_a, lora_b = _lora_weights(in_features, sizes, rank, slots, gen)
    lora_batch = LoRABatch(slots, 128, "cuda")
    lora_batch.set_step([(i % slots, 1) for i in range(batch)])
    x = torch.randn(batch, in_features, generator=gen).to("cuda", torch.bfloat16)
    base = torch.randn(batch, sum(sizes), generator=gen).to("cuda", torch.bfloat16)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    expected = lora_reference(x, base.clone(), lora_a, lora_b, list(zip(offsets, sizes)), rank,
                              lora_batch.segments.host_groups)  # fmt: skip
    shrink_cfg, expand_cfg = launch_plan.ShrinkConfig(fma_rows=0, min_tiles=4), None
    if knobs == "walk_wide":
        shrink_cfg = launch_plan.ShrinkConfig(programs_per_sm=8)
        expand_cfg = launch_plan.ExpandConfig(block_n=256, token_programs=1, num_warps=8)
    out = base.clone()
    y = triton_lora.shrink(x, lora_a, lora_batch.segments, config=shrink_cfg)
    triton_lora.expand(y, lora_b, out, torch.tensor(offsets, dtype=torch.int32, device="cuda"),
                       torch.tensor(sizes, dtype=torch.int32, device="cuda"), max(sizes), rank,
                       lora_batch.segments, expand_cfg)  # fmt: skip
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=2e-2)
