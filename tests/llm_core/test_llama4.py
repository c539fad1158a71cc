"""Llama 4's text decoder (`Llama4ForCausalLM`) against transformers on tiny random checkpoints:
chunked local rotary layers with chunks shorter than the prompts and global NoPE layers,
interleaved rotary (served through the q/k row permutation), L2 q/k norms, attention
temperature tuning, dense / MoE interleaving with sigmoid-scaled expert inputs and the shared
expert, top-1 and top-2 routing, llama3 rope scaling; the engine's invariances with its chunked
and global KV groups. (Reference: transformers 5.17 as pinned; the text model also matches 5.24,
whose multimodal class is broken: tests/sdk/test_llama4_vl_parity.py.)"""

import pytest
import torch

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.models.llama4 import halves_order
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import assert_matches_transformers, run_preempted, tiny_checkpoint

PROMPTS = [
    [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29],  # 17 > chunk 8
    [7, 8, 9],
    [300 + i for i in range(40)],
]

PATTERNS = {
    # 3 chunked rotary + 1 global NoPE layer, MoE on layers 1 and 3, top-1
    "default": {},
    "moe_every_layer_top2": {"interleave_moe_layer_step": 1, "num_experts_per_tok": 2},
    "nope_first_plain": {
        "no_rope_layers": [0, 1, 1, 0],
        "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "attention_chunk_size": 16,
        "attention_bias": True,
    },
    "llama3_scaling": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    },
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_matches_transformers(tmp_path_factory, pattern):
    path = tiny_checkpoint(tmp_path_factory, "llama4", **PATTERNS[pattern])
    assert_matches_transformers(path, PROMPTS, steps=10)


def test_chunked_prefill_below_the_chunk(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llama4")
    assert_matches_transformers(path, PROMPTS, steps=8, max_num_batched_tokens=5)


def test_chunked_prefill_in_the_interpreted_triton_kernels(tmp_path_factory):
    """The Triton attention kernels (interpreted on CPU) with the chunked mask, a NoPE global
    layer and a prompt split across steps: still transformers' tokens and logits."""
    pytest.importorskip("triton")
    from tests.llm_core import interpreted

    if not interpreted.IN_PROCESS:
        pytest.skip("the Triton kernels are compiled in this process (GPU tests cover them)")
    path = tiny_checkpoint(tmp_path_factory, "llama4")
    assert_matches_transformers(
        path, PROMPTS[:2], steps=6, logit_steps=6, attention_backend="triton",
        max_num_batched_tokens=12,
    )  # fmt: skip


def test_halves_order_turns_interleaved_pairs_into_halves():
    assert halves_order(8, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    # interleaved rotation of x == half-split rotation of x's rows in that order
    x, angles = torch.randn(3, 2, 8), torch.rand(3, 4)
    pairs = torch.view_as_complex(x.unflatten(-1, (4, 2)))
    interleaved = torch.view_as_real(pairs * torch.polar(torch.ones(3, 4), angles)[:, None])
    halves = x[..., halves_order(8, 8)]
    a, b = halves.chunk(2, -1)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    torch.testing.assert_close(rotated, interleaved.flatten(-2)[..., halves_order(8, 8)])


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "llama4"))


def _run(engine, prompts):
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


def _engine(ckpt, **kw):
    return Engine(ckpt, dtype="float32", device="cpu", **{"num_kv_blocks": 128, **kw})


def test_invariant_to_batch_chunking_preemption_and_prefix_hits(ckpt):
    alone_engine = _engine(ckpt, enable_prefix_caching=False)
    alone = [_run(alone_engine, [p])[0] for p in PROMPTS]
    assert _run(_engine(ckpt), PROMPTS) == alone  # one batch
    assert _run(_engine(ckpt, max_num_batched_tokens=5), PROMPTS) == alone  # chunks < 8
    # 4-token blocks, 8-token steps: the pool forces preemption
    tiny = _engine(
        ckpt, num_kv_blocks=32, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False
    )
    assert run_preempted(tiny, PROMPTS, GREEDY) == alone
    assert tiny.num_free_blocks == 31  # all but the null block
    cached = _engine(ckpt)
    first = _run(cached, PROMPTS)
    hits = cached.scheduler.kv.num_hit_tokens
    assert _run(cached, PROMPTS) == first == alone
    assert cached.scheduler.kv.num_hit_tokens > hits


def test_chunked_layers_hold_only_their_chunk(ckpt):
    """Three chunked rotary layers and one global: four KV groups of one layer (three chunked);
    the chunked groups' tables keep the blocks of the current 8-token chunk (and the step's)."""
    engine = _engine(ckpt, block_size=4, max_num_batched_tokens=16)
    kv = engine.scheduler.kv
    assert [(s.kind, s.window) for s in kv.specs] == [("chunked", 8)] * 3 + [("full", None)]
    rid = engine.add_request(list(range(5, 105)), SamplingParams(max_tokens=20, ignore_eos=True))
    seq = engine._groups[rid].seqs[0]
    while engine.has_unfinished():
        engine.step()
        if seq.block_tables:
            held = kv.num_held_blocks(seq)
            assert all(h <= (8 + 16) // 4 + 1 for h in held[:3]), held
            if seq.num_computed_tokens > 100:  # decoding: the current chunk's blocks
                assert all(h <= 8 // 4 + 1 for h in held[:3]), held
            assert held[3] == len(seq.block_tables[3])  # the global layer keeps everything
    assert engine.num_free_blocks == kv.num_usable_blocks


def test_shipped_scout_config_layout():
    """`polymodal bench llama4-scout-reduced`'s config (meta device, no weights): Scout's
    widths (20.56B parameters in 8 layers), chunked layers of 8192 with every fourth global,
    every layer MoE, and the KV layout of three chunked groups and one global of two layers."""
    from pathlib import Path

    from polymodal.llm_core.attention import get_backend
    from polymodal.llm_core.config import load_config
    from polymodal.llm_core.kv_cache_spec import plan_layout
    from polymodal.llm_core.models.llama4 import Llama4Moe
    from polymodal.llm_core.registry import encoder_class, model_class

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "sdk" / "configs" / "llama4_scout_reduced", "bfloat16")
    with torch.device("meta"):
        model = model_class(cfg.architecture)(
            cfg, get_backend("torch"), 16, tower=encoder_class(cfg.architecture)
        )
    specs = [(s.kind, s.window) for s in model.kv_cache_specs()]
    assert specs == ([("chunked", 8192)] * 3 + [("full", None)]) * 2
    assert all(isinstance(layer.feed_forward, Llama4Moe) for layer in model.model.layers)
    layout = plan_layout(model.kv_cache_specs())
    assert [(g.spec.kind, g.layers) for g in layout.groups] == [
        ("chunked", [0, 1]), ("chunked", [2, 4]), ("chunked", [5, 6]), ("full", [3, 7])
    ]  # fmt: skip
