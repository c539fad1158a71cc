"""The few-row MoE decode kernels (`layers/moe_route.py`, `layers/moe_decode.py`) against the
torch router and the dense per-expert loop, on CPU under TRITON_INTERPRET=1 (set up in
`interpreted.py`): Mixtral's top-2 and Qwen3's top-8 routing with and without renormalization,
ties, a deferred RMSNorm input, rows sharing experts, the residual epilogue, and a decoder whose
decode steps take it (DeepSeek-V3's router and shared experts: `test_moe_decode_deepseek.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.llm_core.layers import moe_decode
from polymodal.llm_core.layers.gemv import GemvConfig
from polymodal.llm_core.layers.moe import RouterConfig, experts_reference, route
from polymodal.llm_core.layers.norm import AddedResidual, DeferredNorm, rms_norm_torch
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

HIDDEN, INTER = 48, 40  # odd sizes: partial tiles
ROUTERS = {  # name: (experts, top_k)
    "mixtral": (8, 2),
    "qwen3": (32, 8),
}


def deferred(rows, dtype, seed=0, block=8):
    """A `DeferredNorm` of random rows (sums of squares per `block` features, as a GEMV's
    epilogue writes them) and its reference normalization."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, HIDDEN, generator=gen).to(dtype)
    sumsq = (h.float() ** 2).view(rows, -1, block).sum(-1)
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)
    norm = DeferredNorm(h, sumsq, weight, 1e-6)
    return norm, rms_norm_torch(h, weight, 1e-6)[0]


def make_experts(num_experts, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) * HIDDEN**-0.5
    down = torch.randn(num_experts, HIDDEN, INTER, generator=gen) * INTER**-0.5
    return gate_up.to(dtype), down.to(dtype)


def assert_same_choice(weights, ids, ref_weights, ref_ids, logits, dtype):
    """fp32: the same experts in the same slots. bf16: logits tie often (and the interpreter
    truncates where a GPU rounds): slot by slot, the chosen experts' logits are the reference's
    up to bf16 rounding. Weights as close as the dtype allows."""
    if dtype == torch.float32:
        assert torch.equal(ids.long(), ref_ids)
    else:
        chosen, ref_chosen = logits.gather(1, ids.long()), logits.gather(1, ref_ids)
        assert_close(chosen, ref_chosen, dtype)
    assert_close(weights, ref_weights, dtype)


@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("norm", [False, True])
def test_route_matches_the_torch_router(name, renormalize, dtype, rows, norm):
    """Same experts in the same slot order and the same weights as `route` over `F.linear`'s
    logits (of the normalized rows when x is a `DeferredNorm`). Twice: the counter resets."""
    num_experts, top_k = ROUTERS[name]
    gen = torch.Generator().manual_seed(rows + 7 * num_experts)
    weight = torch.randn(num_experts, HIDDEN, generator=gen).to(dtype)
    x, normed = deferred(rows, dtype, seed=rows)
    if not norm:
        x = normed
    ref_weights, ref_ids = route(F.linear(normed, weight), RouterConfig(top_k, renormalize))
    for _ in range(2):
        weights, ids = moe_decode.route(x, weight, top_k, renormalize)
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32
        assert_same_choice(weights, ids, ref_weights, ref_ids, F.linear(normed, weight), dtype)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_ties_go_to_the_lower_expert(renormalize):
    """Router rows that are multiples of one vector give exactly tied logits: experts 1, 4 and
    6 tie for first (top-2 takes 1 and 4); at top-6, 2 and 7 tie for the last slot (2 wins).
    The weights equal the torch router's, whichever tied expert it took."""
    scale = torch.tensor([0.1, 0.9, 0.4, 0.5, 0.9, 0.6, 0.9, 0.4])
    weight = scale[:, None] * torch.linspace(-1, 1, HIDDEN)[None, :]
    x = torch.linspace(-1, 1, HIDDEN)[None, :] * 2
    logits = F.linear(x, weight)
    for top_k, expected in ((2, [1, 4]), (5, [1, 4, 6, 5, 3]), (6, [1, 4, 6, 5, 3, 2])):
        weights, ids = moe_decode.route(x, weight, top_k, renormalize)
        assert ids.tolist() == [expected]
        ref_weights, _ = route(logits, RouterConfig(top_k, renormalize))
        torch.testing.assert_close(weights, ref_weights)


def test_route_scaling_and_small_tiles():
    """`scaling` multiplies the final weights; one expert per program, K in 16-wide tiles."""
    gen = torch.Generator().manual_seed(3)
    weight, x = torch.randn(8, HIDDEN, generator=gen), torch.randn(2, HIDDEN, generator=gen)
    ref_weights, ref_ids = route(F.linear(x, weight), RouterConfig(3, True, scaling=2.5))
    weights, ids = moe_decode.route(x, weight, 3, True, 2.5, GemvConfig(block_n=1, block_k=16))
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_weights)


def test_route_one_tile_config_and_nan_rows():
    """K in one tile, one expert a program (the CUDA config for Qwen3's router): the torch
    router's choice. A NaN row (CUDA-graph padding) still names distinct experts in range and
    leaves the other rows' choice alone."""
    num_experts, top_k = ROUTERS["qwen3"]
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(num_experts, HIDDEN, generator=gen)
    x = torch.randn(3, HIDDEN, generator=gen)
    ref_weights, ref_ids = route(F.linear(x, weight), RouterConfig(top_k, True))
    one_tile = GemvConfig(block_n=1, block_k=64, num_warps=1)
    weights, ids = moe_decode.route(x, weight, top_k, True, config=one_tile)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    x[1] = float("nan")
    weights, ids = moe_decode.route(x, weight, top_k, True, config=one_tile)
    assert sorted(ids[1].tolist()) == list(range(top_k))  # distinct, in range
    assert torch.equal(ids[[0, 2]].long(), ref_ids[[0, 2]])


EXPERT_CASES = {  # name: (rows, experts, top_k, experts the rows choose from)
    "mixtral_one_row": (1, 8, 2, None),
    "qwen3_one_row": (1, 32, 8, None),
    "rows_share_experts": (4, 8, 3, [0, 2, 5, 6]),  # every expert chosen by 3 rows
    "eight_rows": (8, 16, 2, None),
}


def make_routing(rows, num_experts, top_k, allowed, seed=2):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.arange(num_experts) if allowed is None else torch.tensor(allowed)
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:top_k]]
                       for _ in range(rows)])  # fmt: skip
    weights = torch.rand(rows, top_k, generator=gen) + 0.1
    return weights, ids


@pytest.mark.parametrize("case", sorted(EXPERT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_match_the_dense_reference(case, dtype):
    """Plain x: `[M, H]` in x's dtype equal to the dense loop. Twice: the counters reset."""
    rows, num_experts, top_k, allowed = EXPERT_CASES[case]
    gate_up, down = make_experts(num_experts, dtype)
    weights, ids = make_routing(rows, num_experts, top_k, allowed)
    _, x = deferred(rows, dtype)
    ref = experts_reference(x.float(), gate_up.float(), down.float(), weights, ids)
    for _ in range(2):
        out = moe_decode.experts(x, gate_up, down, weights, ids)
        assert out.dtype == dtype and out.shape == (rows, HIDDEN)
        assert_close(out, ref, dtype)


# (gate_up's, down's) launch: all of K in one tile (`expert_config(one_tile=True)`; down's
# first tile, loaded before its PDL wait, is all of it), one of each, both tiled (gate_up K 48,
# down K 40)
ONE_TILE_CONFIGS = {
    "both_one_tile": (GemvConfig(block_n=4, block_k=64), GemvConfig(block_n=8, block_k=64)),
    "gate_up_one_tile": (GemvConfig(block_n=4, block_k=64), GemvConfig(block_n=8, block_k=16)),
    "down_one_tile": (GemvConfig(block_n=16, block_k=16), GemvConfig(block_n=4, block_k=64)),
    # each next tile a tile ahead (three tiles of 16, down's last one partial)
    "both_prefetch": (
        GemvConfig(block_n=4, block_k=16, prefetch=True),
        GemvConfig(block_n=8, block_k=16, prefetch=True),
    ),  # fmt: skip
    # the K loops through shared memory (`tl.range(num_stages=...)`; the interpreter runs them
    # as plain loops: this checks the loop bounds and the arguments' path)
    "both_stages": (
        GemvConfig(block_n=4, block_k=16, num_stages=3),
        GemvConfig(block_n=8, block_k=16, num_stages=2),
    ),  # fmt: skip
}


@pytest.mark.parametrize(
    "configs,early_loads",
    [(name, True) for name in sorted(ONE_TILE_CONFIGS)]
    + [("down_one_tile", False), ("both_prefetch", False)],
)
@pytest.mark.parametrize("case", ["qwen3_one_row", "rows_share_experts", "eight_rows"])
def test_experts_one_tile_configs_match_the_dense_reference(configs, early_loads, case):
    """Every launch shape `expert_config` picks, with a deferred norm in and the residual out,
    down's loads before or after its wait (`early_loads`): the dense loop's output (random
    routing, fewer rows than experts, rows sharing experts)."""
    rows, num_experts, top_k, allowed = EXPERT_CASES[case]
    gate_up, down = make_experts(num_experts, torch.float32)
    weights, ids = make_routing(rows, num_experts, top_k, allowed, seed=rows)
    x, normed = deferred(rows, torch.float32, seed=rows)
    residual = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(6))
    ref = experts_reference(normed, gate_up, down, weights, ids) + residual
    for _ in range(2):  # the counters reset
        added = moe_decode.experts(x, gate_up, down, weights, ids, residual,
                                   configs=ONE_TILE_CONFIGS[configs],
                                   early_loads=early_loads)  # fmt: skip
        assert_close(added.h, ref, torch.float32)


def test_expert_configs_refuse_prefetch_with_stages():
    with pytest.raises(ValueError, match="exclude"):
        GemvConfig(block_n=4, block_k=16, prefetch=True, num_stages=2)


def test_expert_config_is_tiled_unless_one_tile_is_asked():
    """Qwen3-30B-A3B's experts at one token (8 pairs, an H200's 132 SMs): one wave of tiled
    programs by default (gate_up 16 x 512: 768 programs, down 32 x 256: 512); `one_tile`: all
    of K in one tile (gate_up 4 x 2048, down 8 x 1024, 8 warps) where K and the rows are short;
    Mixtral's and DeepSeek-V3's long K / many rows stay tiled either way."""
    config = moe_decode.expert_config
    assert config(8, 1536, 2048, 132, True) == GemvConfig(block_n=16, block_k=512)
    assert config(8, 2048, 768, 132, True) == GemvConfig(block_n=32, block_k=256)
    one_tile = GemvConfig(block_n=4, block_k=2048, num_warps=8)
    assert config(8, 1536, 2048, 132, True, one_tile=True) == one_tile
    one_tile = GemvConfig(block_n=8, block_k=1024, num_warps=8)
    assert config(16, 2048, 768, 132, True, one_tile=True) == one_tile
    for pairs, n, k in ((32, 2048, 768), (2, 28672, 4096), (9, 7168, 2048)):
        for flag in (False, True):
            cfg = config(pairs, n, k, 132, True, one_tile=flag)
            assert cfg.block_k * cfg.block_n == 8192 and cfg.num_warps == 4


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_deferred_norm_in_residual_out(rows, dtype):
    """A `DeferredNorm` in (normalized as it loads) and the residual added in the epilogue:
    h = round(out) + residual rounded as torch adds, with the sums of h^2 per feature block
    (16 wide: 3 blocks) that the next GEMV's deferred norm reads. (bf16 within its rounding
    of the output's scale: h = out + residual cancels.)"""
    gate_up, down = make_experts(8, dtype)
    weights, ids = make_routing(rows, 8, 3, [1, 3, 4, 7])
    x, normed = deferred(rows, dtype)
    residual = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(5)).to(dtype)
    ref = experts_reference(normed.float(), gate_up.float(), down.float(), weights, ids)
    ref = (ref.to(dtype).float() + residual.float()).to(dtype)
    added = moe_decode.experts(x, gate_up, down, weights, ids, residual)
    assert isinstance(added, AddedResidual) and added.sumsq.shape == (rows, 3)
    scale = 1.0 if dtype == torch.float32 else ref.abs().max().item()
    assert_close(added.h / scale, ref / scale, dtype)
    h = added.h.float()
    blocks = torch.stack([(h[:, i : i + 16] ** 2).sum(1) for i in range(0, HIDDEN, 16)], 1)
    torch.testing.assert_close(added.sumsq, blocks)


def test_experts_read_only_the_chosen_experts():
    """NaN in every expert no row chose changes nothing."""
    gate_up, down = make_experts(16, torch.float32)
    weights, ids = make_routing(2, 16, 4, [0, 3, 5, 9, 12])
    _, x = deferred(2, torch.float32)
    ref = moe_decode.experts(x, gate_up, down, weights, ids)
    unchosen = [e for e in range(16) if e not in ids.flatten().tolist()]
    gate_up[unchosen], down[unchosen] = float("nan"), float("nan")
    assert torch.equal(moe_decode.experts(x, gate_up, down, weights, ids), ref)


def test_a_rows_output_does_not_depend_on_the_other_rows():
    """Each row's sum runs over its own slots in order: the same bits alone or in a batch."""
    gate_up, down = make_experts(8, torch.float32)
    weights, ids = make_routing(3, 8, 3, [0, 2, 5, 6])
    _, x = deferred(3, torch.float32)
    together = moe_decode.experts(x, gate_up, down, weights, ids)
    for row in range(3):
        alone = moe_decode.experts(x[row : row + 1], gate_up, down, weights[row : row + 1],
                                   ids[row : row + 1])  # fmt: skip
        assert torch.equal(alone[0], together[row])


def test_bad_inputs_name_the_shapes():
    gate_up, down = make_experts(4, torch.float32)
    weights, ids = make_routing(9, 4, 2, None)
    with pytest.raises(ValueError, match="M <= 8"):
        moe_decode.experts(torch.randn(9, HIDDEN), gate_up, down, weights, ids)
    with pytest.raises(ValueError, match="one dtype"):
        moe_decode.route(torch.randn(1, HIDDEN).half(), gate_up[0, :4], 2)
    with pytest.raises(ValueError, match="does not match"):
        moe_decode.experts(torch.randn(1, HIDDEN), gate_up, down[:, :, :8], weights, ids)


def test_moe_decoder_steps_take_the_fused_path(tmp_path_factory, monkeypatch):
    """Qwen3-MoE with the GEMV and `fused_decode` set (as `enable_gemv` / `enable_moe_decode`
    do on CUDA): decode steps of one request route, run the experts and add the residual in the
    three launches (a `DeferredNorm` in, an `AddedResidual` out); tokens and logits equal the
    plain model's."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.layers import gemv
    from polymodal.llm_core.layers.linear import Linear
    from polymodal.llm_core.layers.moe import SparseMoeBlock
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits, tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "qwen3_moe")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    runs = []
    for fused in (False, True):
        engine = Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=16,
                        skip_tokenizer_init=True)  # fmt: skip
        runner = engine.runner
        runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 1, 16, runner.uses_mrope)
        calls = []
        if fused:
            for module in runner.model.modules():
                if isinstance(module, Linear):
                    module.gemv = gemv.gemv
                if isinstance(module, SparseMoeBlock):
                    module.fused_decode = True

            def traced(x, *args, calls=calls, original=moe_decode.experts, **kwargs):
                out = original(x, *args, **kwargs)
                calls.append((type(x).__name__, type(out).__name__))
                return out

            monkeypatch.setattr(moe_decode, "experts", traced)
        seen = record_logits(engine)
        rid = engine.add_request([5, 17, 42, 99, 3], params)
        runs.append((engine.run_until_done()[rid].outputs[0].token_ids, seen, calls))
    (tokens, seen, _), (fused_tokens, fused_seen, calls) = runs
    assert fused_tokens == tokens and len(fused_seen) == len(seen) == 3
    for got, ref in zip(fused_seen, seen):
        assert_close(got, ref, torch.float32)
    assert calls and all(call == ("DeferredNorm", "AddedResidual") for call in calls)
