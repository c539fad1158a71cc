"""`scheduling_policy="priority"` (vLLM's): waiting requests are admitted by (priority,
arrival), a full pool preempts the running request of the highest value and it returns to its
place; under "fcfs" a non-zero priority is refused; end to end, priorities only reorder."""

from __future__ import annotations

import pytest

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.request import Request
from polymodal.llm_core.scheduler import Scheduler
from tests.helpers import tiny_checkpoint


def _req(rid: str, priority: int, n_tokens: int = 8) -> Request:
    start = 100 * sum(map(ord, rid))  # distinct prompts: no prefix-cache hits between them
    ids = list(range(start, start + n_tokens))
    return Request(rid, ids, SamplingParams(max_tokens=4), priority=priority)


def _admitted(sched: Scheduler) -> list[str]:
    """One step's requests, each then finished (the scheduler alone, no model)."""
    out = sched.schedule()
    sched.update(out)
    for req in out.requests:
        sched.finish(req, "stop")
    return [r.request_id for r in out.requests]


def test_waiting_requests_are_admitted_by_priority_then_arrival():
    sched = Scheduler(KVCacheManager(num_blocks=64, block_size=4), 8, policy="priority")
    for rid, priority in (("a", 2), ("b", 0), ("c", 1), ("d", 0)):
        sched.add(_req(rid, priority))  # one 8-token prompt fills a step's budget
    assert [_admitted(sched) for _ in range(4)] == [["b"], ["d"], ["c"], ["a"]]
    fcfs = Scheduler(KVCacheManager(num_blocks=64, block_size=4), 8)
    for rid, priority in (("a", 2), ("b", 0)):
        fcfs.add(_req(rid, priority))
    assert [_admitted(fcfs) for _ in range(2)] == [["a"], ["b"]]


def test_a_full_pool_preempts_the_lowest_priority_and_requeues_it_in_place():
    # 6 blocks of 4: three 8-token prompts fill them; the next token of any needs a 7th
    sched = Scheduler(KVCacheManager(num_blocks=6, block_size=4), 64, policy="priority")
    reqs = {rid: _req(rid, p) for rid, p in (("low", 5), ("high", 0), ("mid", 1))}
    for req in reqs.values():
        sched.add(req)
    out = sched.schedule()
    assert [r.request_id for r in out.requests] == ["high", "mid", "low"]
    sched.update(out)
    for req in reqs.values():  # each sampled a token: one more to run
        req.output_token_ids.append(1)
        req.num_pending = 0
    late = _req("late", 3)
    sched.add(late)
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["low"]
    assert [r.request_id for r in sched.waiting] == ["late", "low"]  # 3 before 5
    assert "low" not in [r.request_id for r in out.requests]


def test_priority_end_to_end(tmp_path_factory):
    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    fcfs = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=64)
    want = [o.outputs[0].token_ids for o in fcfs.generate(prompts, params, use_tqdm=False)]
    with pytest.raises(InvalidInputError, match="needs scheduling_policy='priority'"):
        fcfs.generate(prompts, params, use_tqdm=False, priority=[0, 1, 0])
    llm = LLM(ckpt, dtype="float32", device="cpu", num_kv_blocks=64,
              scheduling_policy="priority", max_num_seqs=1)  # fmt: skip
    outs = llm.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    assert [o.outputs[0].token_ids for o in outs] == want  # in input order, unchanged
    # queued together (as a server's requests are), one running at a time: by priority
    ids = [llm.submit({"prompt_token_ids": p, "priority": v}, params)
           for p, v in zip(prompts, (2, 0, 1))]  # fmt: skip
    outs = llm.run(ids)
    assert [o.outputs[0].token_ids for o in outs] == want
    first = sorted(outs, key=lambda o: o.metrics.first_scheduled_time)
    assert [o.prompt_token_ids for o in first] == [prompts[1], prompts[2], prompts[0]]
    with pytest.raises(InvalidInputError, match="priority has 2 values for 3 prompts"):
        llm.generate(prompts, params, use_tqdm=False, priority=[0, 1])
    with pytest.raises(InvalidInputError, match="scheduling_policy must be"):
        LLM(ckpt, device="cpu", scheduling_policy="lifo")
