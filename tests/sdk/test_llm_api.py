"""The LLM API as a user calls it: chat, streaming deltas, stop strings, logprobs, n."""

import io

import pytest
from PIL import Image

from polymodal import LLM, SamplingParams
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2")), dtype="float32", device="cpu")


def test_stream_deltas_concatenate_to_final_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    final = llm.generate("Hello, how are you?", params)[0].outputs[0]
    deltas = [o.outputs[0].delta_text for o in llm.stream("Hello, how are you?", params)]
    assert "".join(deltas) == final.text and len(deltas) > 1
    assert llm.engine.num_free_blocks == llm.engine.scheduler.kv.num_blocks


def test_stop_string_spanning_tokens_is_excluded(llm):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    full = llm.generate("The quick brown fox", params)[0].outputs[0].text
    stop = full[5:9]  # four characters from inside the output, likely across tokens
    out = llm.generate(
        "The quick brown fox",
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]),
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]


def test_chat_logprobs_and_n(llm):
    messages = [{"role": "user", "content": "Describe the sky."}]
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=5, logprobs=2)
    out = llm.chat(messages, params)[0]
    assert len(out.outputs) == 3 and out.usage.completion_tokens == 15
    for seq in out.outputs:
        assert len(seq.logprobs) == 5 and all(len(step) >= 2 for step in seq.logprobs)
    assert len({tuple(s.token_ids) for s in out.outputs}) > 1


def test_failed_step_leaves_engine_clean(llm, monkeypatch):
    start = llm.engine.num_free_blocks
    original = llm.engine.runner.launch

    def broken(*args):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(llm.engine.runner, "launch", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate(["one", "two"], SamplingParams(max_tokens=4))
    monkeypatch.setattr(llm.engine.runner, "launch", original)
    assert not llm.engine.has_unfinished() and llm.engine.num_free_blocks == start
    out = llm.generate("three", SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_warm_up_runs_each_kind_and_leaves_the_engine_clean(tmp_path_factory, monkeypatch):
    """warmup=True (the CUDA default) runs a text, an image and a video request at load; the
    engine is idle with every KV block free afterwards, and later outputs are unchanged."""
    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2_vl"))
    seen = []
    original = LLM.generate

    temperatures = []

    def generate(self, prompts, params=None, **kwargs):
        seen.append(prompts)
        temperatures.append(params.temperature)
        return original(self, prompts, params, **kwargs)

    monkeypatch.setattr(LLM, "generate", generate)
    warm = LLM(ckpt, device="cpu", warmup=True, num_kv_blocks=128)
    kinds = [
        [p.get("type") for p in prompt[0]["content"]] if isinstance(prompt[0], dict) else "ids"
        for prompt in seen
    ]
    image = ["image", "text"]
    assert kinds == ["ids", "ids", image, image, image, ["video", "text"]]
    assert temperatures[0] > 0 and temperatures[1] == 0  # the sampler's kernels warm too
    # the two images differ: the same content would hit the encoder cache the second time,
    # and the tower's CUDA graph of that layout would wait for the first user request
    assert seen[2][0]["content"][0]["image"] != seen[3][0]["content"][0]["image"]
    # the third is of an odd size, so the GPU resize kernels compile at load too
    odd = Image.open(io.BytesIO(seen[4][0]["content"][0]["image"]))
    assert odd.size[0] % 28 and odd.size[1] % 28
    assert warm.warmup_seconds > 0
    assert not warm.engine.has_unfinished()
    assert warm.engine.num_free_blocks == warm.engine.scheduler.kv.num_blocks
    cold = LLM(ckpt, device="cpu", num_kv_blocks=128)
    assert cold.warmup_seconds == 0  # off by default on the CPU
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = [{"role": "user", "content": [{"type": "image", "image": "examples/sample.png"},
                                           {"type": "text", "text": "What is it?"}]}]  # fmt: skip
    assert (
        original(warm, prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        == original(cold, prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    )
