"""The load-time warm-up of long prompts and large media (`llm_core/load_warmup.py`), on CPU with
the Triton interpreter: tiny chunks stand in for the 1100-token ones (SDPA threshold lowered),
cuDNN is faked (CPU SDPA runs flash) so that shape admission is exercised, and the tower's
equal segments take SDPA on CPU too."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from polymodal.llm_core.attention import causal_sdpa, triton_backend
from polymodal.llm_core.load_warmup import warm_up_long_paths
from tests.helpers import record_logits, record_sdpa_contexts, tiny_checkpoint
from tests.llm_core.interpreted import (
    _interpreted_only,  # noqa: F401  (autouse fixture)
    assert_close,
    test_interpreted_in_subprocess,  # noqa: F401
)

CHUNK = 24


@pytest.fixture(autouse=True)
def _fake_cudnn(monkeypatch):
    monkeypatch.setattr(causal_sdpa, "SDPA_MIN_CAUSAL", 16)
    key = lambda q, k, v, causal, gqa=False: (tuple(q.shape), tuple(k.shape), causal)  # noqa: E731
    monkeypatch.setattr(causal_sdpa, "cudnn_key", key)
    monkeypatch.setattr(triton_backend, "cudnn_key", key)

    def equal_segments(q, k, v, cu_seqlens, max_seqlen):  # any device, dtype and length
        segments = cu_seqlens.shape[0] - 1
        return segments if q.shape[0] == segments * max_seqlen == k.shape[0] else 0

    monkeypatch.setattr(triton_backend, "sdpa_segments", equal_segments)


def engine_and_backend(path):
    from polymodal.llm_core.engine import Engine

    engine = Engine(
        str(path), dtype="float32", device="cpu", attention_backend="triton",
        max_num_batched_tokens=32, num_kv_blocks=64,
    )  # fmt: skip
    contexts = record_sdpa_contexts(engine, True)
    return engine, engine.runner.model.visual.attn_backend, contexts


def small_grids(model, calls: list) -> None:
    """The model's encoder warm-up at tiny grids, counted."""
    calls.append(1)
    type(model).warm_up_encoder(model, ((1, 4, 8), (2, 4, 4)))


def test_warm_up_builds_what_it_runs_and_changes_no_output(tmp_path_factory):
    from polymodal.llm_core.sampling_params import SamplingParams

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = [(7 * i + 3) % 400 + 20 for i in range(60)]
    runs = []
    for warm in (True, False):
        engine, backend, contexts = engine_and_backend(path)
        model = engine.runner.model
        calls = []
        model.warm_up_encoder = partial(small_grids, model, calls)
        if warm:
            seconds = warm_up_long_paths(engine.runner, 128, 64, chunk=CHUNK)
            assert seconds > 0 and len(calls) == 2  # built, then the kernels' pass
            kinds = {
                key[0] if isinstance(key[0], str) else "context" for key in backend.shapes.built()
            }
            assert kinds == {"fresh", "context", "segments"}  # decoder, both forms; tower
            # the routed pass: fresh, after a chunk, and after a chunk behind a decode row
            assert sorted(set(contexts)) == [0, CHUNK]
            assert contexts.count(CHUNK) == 2 * contexts.count(0)  # the mixed step routed too
        logits = record_logits(engine)
        rid = engine.add_request(prompt, params)
        runs.append((engine.run_until_done()[rid].outputs[0].token_ids, logits))
    (tokens, logits), (ref_tokens, ref_logits) = runs
    assert tokens == ref_tokens
    for got, ref in zip(logits, ref_logits, strict=True):
        assert_close(got, ref, torch.float32)


def test_no_warm_up_without_a_shape_policy(tmp_path_factory):
    from polymodal.llm_core.engine import Engine

    engine = Engine(str(tiny_checkpoint(tmp_path_factory, "qwen2")), dtype="float32", device="cpu")
    assert warm_up_long_paths(engine.runner, 128, 64, chunk=CHUNK) == 0.0  # torch backend


def test_warm_up_runs_a_cross_attention_decoder_and_changes_no_output(tmp_path_factory):
    """Mllama (cross KV groups): the decoder's warm-up steps run as a text-only request's, its
    cross layers passing them through (a mixed step's unfused decode kernel compiles at load,
    not inside a captioning job's first eager step), and a later image request's greedy tokens
    and logits equal those of an engine that never warmed up."""
    from polymodal import LLM, SamplingParams
    from tests.helpers import record_logits_by_request
    from tests.sdk.vl_reference import messages, random_image

    path = tiny_checkpoint(tmp_path_factory, "mllama")
    prompts = [{"messages": messages([random_image(64, 48, 0)])}, {"messages": messages([])}]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    runs = []
    for warm in (True, False):
        llm = LLM(str(path), dtype="float32", device="cpu", attention_backend="triton",
                  num_kv_blocks=256, max_num_batched_tokens=32)  # fmt: skip
        runner = llm.engine.runner
        assert runner.num_cross_groups > 0
        if warm:
            contexts = record_sdpa_contexts(llm.engine, True)
            runner.model.warm_up_encoder = lambda: None
            crossed = _cross_calls(partial(warm_up_long_paths, runner, 128, 256, chunk=CHUNK))
            assert sorted(set(contexts)) == [0, CHUNK] and crossed == 0
        seen = record_logits_by_request(llm.engine)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, torch.stack(seen[o.request_id])) for o in outs])
    for (tokens, logits), (ref_tokens, ref_logits) in zip(*runs, strict=True):
        assert tokens == ref_tokens
        assert_close(logits, ref_logits, torch.float32)


def _cross_calls(fn) -> int:
    """How many Mllama cross-attention calls `fn()` makes (it must return a positive time)."""
    from polymodal.llm_core.models import mllama

    calls, original = [], mllama.MllamaCrossAttention.forward

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    mllama.MllamaCrossAttention.forward = counted
    try:
        assert fn() > 0
    finally:
        mllama.MllamaCrossAttention.forward = original
    return len(calls)
