"""VILA 1.5 / NVILA / NVILA-Lite (`LlavaLlamaModel`) end to end (processor + SigLIP + projector +
decoder) against the independent reference of `vila_reference.py` (transformers' blocks
composed as the public code composes them), fp32 on the CPU: one image (NVILA: dynamic-S2
tiles; NVILA-Lite: dynamic tiles + thumbnail), several images (one view each), a video (NVILA:
frames averaged in pairs), an image with a video, a mixed batch with a text-only prompt, and
chunked prefill that splits media across steps. Checkpoints are in the hub's folder layout."""

import pytest

from polymodal import LLM
from polymodal.bench.vila_reference import VilaReference
from tests.helpers import tiny_checkpoint
from tests.sdk.vl_reference import assert_batch_matches, assert_single_matches, random_image

STEPS = 6
ARCHS = ["nvila", "nvila_lite", "vila1.5"]
FRAMES = [random_image(40, 30, 10 + i) for i in range(6)]
CASES = {
    "one_image": [random_image(90, 40, 0)],
    "one_tall_image": [random_image(20, 150, 1)],
    "three_images": [random_image(28, 28, 1), random_image(90, 40, 2), random_image(9, 50, 3)],
    "video": [("video", FRAMES)],
    "image_and_video": [random_image(64, 48, 4), ("video", FRAMES[::-1])],
}


def messages(parts, text="Describe.") -> list[dict]:
    content = [
        {"type": "video", "video": p[1]} if isinstance(p, tuple) else {"type": "image", "image": p}
        for p in parts
    ]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, request.param)
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=256)
    return path, VilaReference(path), llm


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_reference(models, case):
    _, ref, llm = models
    tokens, logits = ref.greedy(CASES[case] + ["Describe."], STEPS)
    assert_single_matches(llm, {"messages": messages(CASES[case])}, tokens, logits, STEPS, case)


def test_prompt_tokens_match_the_reference_stream(models):
    """The processor's token ids are the reference's prompt with each media token replaced by
    its embedding count of slots (and the separators' ids): same length, same text tokens."""
    _, ref, llm = models
    for case, parts in CASES.items():
        processed = llm.processor.process(messages=messages(parts))
        expected = ref.inputs_embeds(parts + ["Describe."])
        assert len(processed.token_ids) == expected.shape[0], case


def test_mixed_batch_matches_reference(models):
    _, ref, llm = models
    cases = list(CASES.values()) * 2
    refs = [ref.greedy(parts + ["Describe."], STEPS) for parts in cases]
    text = [{"role": "user", "content": "Hello, how are you today?"}]
    refs.append(ref.greedy(["Hello, how are you today?"], STEPS))
    prompts = [{"messages": messages(parts)} for parts in cases] + [text]
    assert_batch_matches(llm, prompts, refs, STEPS)


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill_splits_media_and_matches(models, budget):
    path, ref, _ = models
    llm = LLM(
        str(path), dtype="float32", device="cpu", num_kv_blocks=256,
        max_num_batched_tokens=budget,
    )  # fmt: skip
    parts = CASES["image_and_video"]
    tokens, logits = ref.greedy(parts + ["Describe."], STEPS)
    assert_single_matches(llm, {"messages": messages(parts)}, tokens, logits, STEPS, f"{budget}")
    assert llm.engine.runner.encoder_cache.misses == 2  # each item encoded once
