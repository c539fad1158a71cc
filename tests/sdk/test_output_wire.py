"""The engine-process wire: what crosses per step rebuilds the engine's own outputs exactly."""

from __future__ import annotations

import pickle

import pytest

from polymodal import LLM, SamplingParams
from polymodal.output_wire import Assembler, Encoder
from tests.helpers import tiny_checkpoint


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=7, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[" t", "e"]),
    ],
    ids=["greedy", "n2-logprobs", "stop-strings"],
)
def test_encoded_steps_rebuild_every_output(tmp_path_factory, params):
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2")), num_kv_blocks=64)
    encode, assemble = Encoder(), Assembler()
    for out in llm.stream("The quick brown fox", params):
        wire = pickle.loads(pickle.dumps(encode(out.request_id, out)))
        rebuilt = assemble(out.request_id, wire)
        assert rebuilt.finished == out.finished and rebuilt.usage == out.usage
        assert rebuilt.prompt_token_ids == out.prompt_token_ids
        assert rebuilt.metrics == out.metrics
        for got, want in zip(rebuilt.outputs, out.outputs, strict=True):
            assert got.delta_text == want.delta_text
            assert got.delta_token_ids == want.delta_token_ids
            assert got.token_ids == want.token_ids
            assert (got.finish_reason, got.stop_reason) == (want.finish_reason, want.stop_reason)
            assert got.logprobs == want.logprobs
            assert got.cumulative_logprob == want.cumulative_logprob
            if want.finished:
                assert got.text == want.text
    assert out.finished and not assemble._requests and not encode._started


def test_pooling_outputs_cross_as_raw_bytes():
    """Pooled tensors cross the engine pipe as bytes + dtype + shape (plain values, no
    torch reducers) and come back equal, empty step sets included."""
    import pickle

    import torch

    from polymodal.llm_core.pooling import PoolingOutput, PoolingRequestOutput
    from polymodal.output_wire import Assembler, Encoder

    for data in (torch.randn(3), torch.randn(2, 2).bfloat16(), torch.empty(0, 2)):
        wire = Encoder()("r", PoolingRequestOutput("r", [1, 2], PoolingOutput(data)))
        assert all(not isinstance(v, torch.Tensor) for v in wire[1])
        back = Assembler()("r", pickle.loads(pickle.dumps(wire)))
        assert back.prompt_token_ids == [1, 2] and back.finished
        assert back.outputs.data.dtype == data.dtype and torch.equal(back.outputs.data, data)
