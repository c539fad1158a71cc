"""`LLM.load_weights` (new weights in place, as an RL trainer pushes them) and
`reset_prefix_cache`: after loading checkpoint B into an engine built from A, every answer
(text and image prompts, including ones A's prefix and encoder caches hold) is B's own engine's;
bad sets and loads during requests are refused naming why."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.demo_model import write_demo_checkpoint
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.weights import iter_safetensors
from tests.helpers import tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
MARK = "<|vision_start|><|image_pad|><|vision_end|>"


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))


def _answers(llm: LLM, prompts: list) -> list:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _close(got: list, want: list) -> None:
    for (ids, tables), (want_ids, want_tables) in zip(got, want):
        assert ids == want_ids
        for table, want_table in zip(tables, want_tables):
            assert table.keys() == want_table.keys()
            assert all(abs(table[t] - want_table[t]) < 1e-4 for t in table)


def test_loaded_weights_answer_as_their_own_engine(tmp_path_factory):
    a = tiny_checkpoint(tmp_path_factory, "qwen2_vl")
    b = write_demo_checkpoint(tmp_path_factory.mktemp("b"), "qwen2_vl", seed=1)
    prompts = ["A prompt long enough to fill a few KV blocks of the prefix cache. " * 2,
               {"prompt": MARK + "What is this?", "images": [_image()]}]  # fmt: skip
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=128)
    want = _answers(LLM(str(b), **kw), prompts)
    llm = LLM(str(a), **kw)
    before = _answers(llm, prompts)  # A's KV blocks and image embeddings now cached
    assert before[0][0] != want[0][0] or before[1][0] != want[1][0]
    llm.load_weights(iter_safetensors(b))
    _close(_answers(llm, prompts), want)
    llm.load_weights(iter_safetensors(a))
    _close(_answers(llm, prompts), before)


def test_bad_sets_and_loads_during_requests_are_refused(tmp_path_factory):
    a = tiny_checkpoint(tmp_path_factory, "qwen2")
    llm = LLM(str(a), dtype="float32", device="cpu", num_kv_blocks=64)
    tensors = list(iter_safetensors(a))
    with pytest.raises(ModelLoadError, match="missing"):
        llm.load_weights(tensors[1:])
    with pytest.raises(ModelLoadError, match="unexpected tensors.*not.a.weight"):
        llm.load_weights([*tensors, ("not.a.weight", tensors[0][1])])
    request_id = llm.submit("Hello there", GREEDY)
    with pytest.raises(InvalidInputError, match="while requests run"):
        llm.load_weights(tensors)
    assert llm.reset_prefix_cache() is False
    llm.run([request_id])
    assert llm.reset_prefix_cache() is True
    llm.load_weights(tensors)  # all of them, nothing running: fine


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_replay_the_loaded_weights(tmp_path_factory):
    """On CUDA (decode and tower graphs captured at load, the Triton GEMV, Qwen2.5-VL's fused
    tower MLP): after `load_weights(B)` the answers are B's own engine's, token for token."""
    a = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    b = write_demo_checkpoint(tmp_path_factory.mktemp("b"), "qwen2_5_vl", seed=1)
    prompts = ["Hello", {"prompt": MARK + "What is this?", "images": [_image()]}]
    kw = dict(dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3)
    want = [ids for ids, _ in _answers(LLM(str(b), **kw), prompts)]
    llm = LLM(str(a), **kw)
    _answers(llm, prompts)
    llm.load_weights(iter_safetensors(b))
    assert [ids for ids, _ in _answers(llm, prompts)] == want
