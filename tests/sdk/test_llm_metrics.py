"""`LLM.get_metrics()` (vLLM's `vllm.v1.metrics.reader` shapes): counters, gauges and histograms
that add up to what the requests did."""

from __future__ import annotations

import random

import pytest

from polymodal import LLM, SamplingParams
from polymodal.metrics_reader import Counter, Gauge, Histogram, Vector
from tests.helpers import tiny_checkpoint


def _by_name(metrics) -> dict:
    out: dict = {}
    for m in metrics:
        key = m.name + "".join(f"{{{k}={v}}}" for k, v in sorted(m.labels.items()))
        assert key not in out, f"{key} reported twice"
        out[key] = m
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "qwen2"))


def test_metrics_add_up_to_the_requests(ckpt):
    llm = LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=64)
    before = _by_name(llm.get_metrics())
    assert before["polymodal:prompt_tokens"].value == 0
    assert before["polymodal:time_to_first_token_seconds"].count == 0
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(max_tokens=5, ignore_eos=True),
                         SamplingParams(max_tokens=3, ignore_eos=True, n=2)])  # fmt: skip
    again = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=2))
    m = _by_name(llm.get_metrics())
    assert all(k.startswith("polymodal:") for k in m)
    assert m["polymodal:prompt_tokens"].value == 6 + 3 + 6
    generated = sum(len(c.token_ids) for o in [*outs, *again] for c in o.outputs)
    assert (
        m["polymodal:generation_tokens"].value
        == generated
        == 5 + 2 * 3 + len(again[0].outputs[0].token_ids)
    )
    success = {k: v.value for k, v in m.items() if k.startswith("polymodal:request_success")}
    reasons = [c.finish_reason for o in [*outs, *again] for c in o.outputs]
    assert sum(success.values()) == len(reasons) == 4
    assert success["polymodal:request_success{finished_reason=length}"] == reasons.count("length")
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_prompt_tokens"):  # fmt: skip
        h = m[f"polymodal:{name}"]
        assert isinstance(h, Histogram) and h.count == 3, name
        assert list(h.buckets)[-1] == "+Inf" and h.buckets["+Inf"] == 3
        counts = list(h.buckets.values())
        assert counts == sorted(counts)  # cumulative
    assert m["polymodal:request_prompt_tokens"].sum == 15
    assert m["polymodal:request_prompt_tokens"].buckets["5"] == 1  # the 3-token prompt
    ttft = m["polymodal:time_to_first_token_seconds"]
    e2e = m["polymodal:e2e_request_latency_seconds"]
    assert 0 < ttft.sum <= e2e.sum
    # the repeated prompt found its full blocks in the prefix cache
    assert m["polymodal:prefix_cache_queries"].value == 15
    assert m["polymodal:prefix_cache_hits"].value == again[0].num_cached_tokens
    gauges = {k: v for k, v in m.items() if isinstance(v, Gauge)}
    assert gauges["polymodal:num_requests_running"].value == 0
    assert gauges["polymodal:num_requests_waiting"].value == 0
    assert 0 <= gauges["polymodal:kv_cache_usage_perc"].value <= 1
    assert isinstance(m["polymodal:num_preemptions"], Counter)
    per_pos = m["polymodal:spec_decode_num_accepted_tokens_per_pos"]
    assert isinstance(per_pos, Vector) and per_pos.values == []  # no drafts
    assert m["polymodal:spec_decode_num_drafts"].value == 0


def test_speculative_counters(ckpt):
    """n-gram drafts: the per-position vector sums to the accepted drafts, and no position
    accepts more often than the one before it."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    llm = LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=256, speculative_config=spec)
    rng = random.Random(0)
    prompts = []
    for n in (9, 19, 29):  # prompts that repeat themselves: drafts find matches
        base = [rng.randrange(10, 470) for _ in range(n)]
        prompts.append({"prompt_token_ids": base + base[: n // 2] + base})
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    m = _by_name(llm.get_metrics())
    per_pos = m["polymodal:spec_decode_num_accepted_tokens_per_pos"].values
    assert len(per_pos) == 3
    assert sum(per_pos) == m["polymodal:spec_decode_num_accepted_tokens"].value
    assert per_pos == sorted(per_pos, reverse=True)
    assert m["polymodal:spec_decode_num_draft_tokens"].value > sum(per_pos) > 0
