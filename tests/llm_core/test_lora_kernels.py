"""The segmented multi-LoRA Triton kernels (shrink + expand) against the torch reference, on CPU
under TRITON_INTERPRET=1 (`interpreted.py`): packed slices, ranks below the padded rank, tokens
without an adapter, idle slots, more tokens than a block, and the grid sized for a padded
(graph-bucket) token count."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.lora.layer import LoRABatch
from polymodal.llm_core.lora.ops import lora_reference, lora_triton
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

CASES = {  # name: (in, slice sizes, max_rank, slots, per-request (slot, tokens))
    "qkv_packed_mixed": (64, [64, 32, 32], 16, 3, [(0, 5), (-1, 3), (2, 1), (0, 1), (1, 7)]),
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


def _token_slots(requests, padded):
    slots = [slot for slot, n in requests for _ in range(n)]
    return slots + [-1] * (padded - len(slots))


def test_segments_group_tokens_by_slot():
    batch = LoRABatch(3, 32, "cpu")
    batch.use_triton = True
    batch.set_step([(2, 2), (-1, 3), (0, 1), (2, 1)])
    seg = batch.segments
    assert seg.seg_len.tolist() == [1, 0, 3] and seg.seg_start.tolist() == [0, 1, 1]
    assert seg.sorted_tokens[:4].tolist() == [5, 0, 1, 6]
    assert [(s, t.tolist()) for s, t in seg.host_groups] == [(0, [5]), (2, [0, 1, 6])]
    assert batch.num_active == 2
    with pytest.raises(ValueError, match="33 tokens exceed"):
        batch.set_step([(0, 33)])


def test_engine_on_the_kernels_equals_merged_weights(tmp_path_factory):
    """The whole engine path with the LoRA layers on the Triton kernels (interpreted): mixed
    adapters in one batch give the merged checkpoints' greedy tokens and logits."""
    pytest.importorskip("peft")
    from polymodal import LoRARequest
    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.helpers import record_logits_by_request, tiny_checkpoint
    from tests.llm_core.lora_adapters import make_adapters

    base = tiny_checkpoint(tmp_path_factory, "llama")
    adapters = make_adapters(base, tmp_path_factory.mktemp("lora_kernels"))
    names = ["all", None, "qv_down", "all"]
    prompts = [[5, 9, 33, 70, 11], [7, 7, 8], list(range(100, 121)), [12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    opts = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 32}

    def run(engine, prompts, loras):
        seen = record_logits_by_request(engine)
        ids = [engine.add_request(p, params, lora_request=lo) for p, lo in zip(prompts, loras)]
        final = engine.run_until_done()
        return [(final[i].outputs[0].token_ids, seen[i]) for i in ids]

    engine = Engine(str(base), enable_lora=True, max_loras=2, **opts)
    engine.runner.lora.batch.use_triton = True
    loras = [None if n is None else LoRARequest(n, 1 + (n == "qv_down"), str(adapters[n][0]))
             for n in names]  # fmt: skip
    for prompt, name, (tokens, logits) in zip(prompts, names, run(engine, prompts, loras)):
        merged = base if name is None else adapters[name][1]
        ref_tokens, ref_logits = run(Engine(str(merged), **opts), [prompt], [None])[0]
        assert tokens == ref_tokens
        for row, ref in zip(logits, ref_logits):
            assert (row - ref).abs().max().item() <= 1e-4
