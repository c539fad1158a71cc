"""What a decode CUDA graph runs, eagerly on the CPU: inputs packed into one buffer, ids still on
the device resolved inside the step, the batch padded to its bucket, LM head and greedy argmax
inside. Same tokens and logits as the plain eager step, for greedy, seeded-sampled, penalized
and logprob rows, with and without async scheduling."""

import numpy as np
import pytest
import torch

from polymodal.llm_core.cuda_graph import DecodeGraphs, StepInputs, resolve_ids
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits, tiny_checkpoint

PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [4], [6, 2]]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=9, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
]


def _run(path, padded: bool, async_scheduling: bool, mix: bool):
    engine = Engine(
        str(path), dtype="float32", device="cpu", num_kv_blocks=64, block_size=4,
        async_scheduling=async_scheduling, skip_tokenizer_init=True,
    )  # fmt: skip
    runner = engine.runner
    if padded:  # not captured: run() packs, pads and runs the graph's forward eagerly
        runner.graphs = DecodeGraphs(
            runner.model, runner.kv_caches, 8, 16, runner.uses_mrope, runner.num_kv_groups
        )
    seen = record_logits(engine)
    params = PARAMS if mix else [PARAMS[0]] * len(PROMPTS)
    ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    done = engine.run_until_done()
    outs = [done[i].outputs[0] for i in ids]
    return [o.token_ids for o in outs], [o.logprobs for o in outs], seen, runner


# 1-row and M-RoPE positions; gemma3: two KV groups (full and sliding), packed tables per group
@pytest.mark.parametrize("arch", ["qwen3", "qwen2_5_vl", "gemma3"])
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("mix", [False, True])
def test_padded_decode_steps_equal_eager(tmp_path_factory, arch, async_scheduling, mix):
    path = tiny_checkpoint(tmp_path_factory, arch)
    tokens, logprobs, seen, _ = _run(path, False, async_scheduling, mix)
    got_tokens, got_logprobs, got_seen, runner = _run(path, True, async_scheduling, mix)
    assert runner.graphs.runs > 5  # most steps went through the graph path
    assert got_tokens == tokens
    assert [len(t) for t in tokens] == [p.max_tokens for p in (PARAMS if mix else [PARAMS[0]] * 5)]
    if mix:
        assert got_logprobs[3] is not None
        for got, ref in zip(got_logprobs[3], logprobs[3]):
            assert got.keys() == ref.keys()
            np.testing.assert_allclose(list(got.values()), list(ref.values()), atol=1e-5)
    assert len(got_seen) == len(seen)
    for got, ref in zip(got_seen, seen):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-4)


def test_resolve_ids_takes_device_tokens_where_pending():
    ids = torch.tensor([10, 11, 12, 13, 14])
    src = torch.tensor([-1, 2, -1, 0, -1])
    tokens = torch.tensor([100, 101, 102])
    assert resolve_ids(ids, src, tokens).tolist() == [10, 102, 12, 100, 14]


def test_step_inputs_upload_copies_the_rows_a_step_uses():
    fields = [
        ("a", torch.int64, (4,)),
        ("b", torch.int32, (3,)),  # 12 bytes: the next view starts 8-byte aligned
        ("tables", torch.int32, (4, 5)),
    ]
    inputs = StepInputs(fields, torch.device("cpu"))
    h = inputs.host_views[1]
    h["a"][:] = [1, 2, 3, 4]
    h["b"][:] = [5, 6, 7]
    h["tables"][:] = np.arange(20).reshape(4, 5)
    inputs.upload(1, rows=2)
    v = inputs.device_views
    assert v["a"].tolist() == [1, 2, 3, 4] and v["b"].tolist() == [5, 6, 7]
    assert v["tables"][:2].flatten().tolist() == list(range(10))
    assert v["tables"][2:].abs().sum() == 0  # rows past the step's are not copied
    assert inputs.host_views[0]["a"].tolist() == [0, 0, 0, 0]  # the other mirror is separate
