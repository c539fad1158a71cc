"""HyperCLOVA X SEED Vision (`HCXVisionForCausalLM`) end to end (processor + SigLIP + C-Abstractor
+ anyres packing + decoder) against the independent reference of `hcx_reference.py`
(transformers' and timm's blocks composed as the published code composes them), fp32 on the
CPU: one image (wide, tall, square, tiny), several images, a mixed batch with a text-only
prompt, and chunked prefill that splits images across steps. Checkpoints are in the hub's
one-folder layout. Video is not served (its processor could not be read): refused by name."""

import pytest

from polymodal import LLM
from polymodal.llm_core.errors import InvalidInputError
from tests.helpers import tiny_checkpoint
from tests.sdk.hcx_reference import HCXReference
from tests.sdk.vl_reference import assert_batch_matches, assert_single_matches, random_image

STEPS = 6
ARCHS = ["hcx_vision", "hcx_vision_plain"]
CASES = {
    "wide_image": [random_image(90, 40, 0)],
    "tall_image": [random_image(20, 150, 1)],
    "square_image": [random_image(56, 56, 2)],
    "tiny_image": [random_image(9, 5, 3)],
    "three_images": [random_image(28, 28, 4), random_image(90, 40, 5), random_image(33, 61, 6)],
}


def messages(images, text="Describe.") -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, request.param)
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=256)
    return path, HCXReference(path), llm


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_reference(models, case):
    _, ref, llm = models
    tokens, logits = ref.greedy(CASES[case], "Describe.", STEPS)
    assert_single_matches(llm, {"messages": messages(CASES[case])}, tokens, logits, STEPS, case)


def test_prompt_length_matches_the_reference_stream(models):
    """The processor's token ids are the reference's prompt with each image token replaced by
    the image's embedding count: the same length."""
    _, ref, llm = models
    for case, images in CASES.items():
        processed = llm.processor.process(messages=messages(images))
        assert len(processed.token_ids) == ref.inputs_embeds(images, "Describe.").shape[0], case


def test_raw_prompt_with_image_tokens_matches_chat(models):
    """A raw prompt holding the rendered template's text gives the chat path's ids."""
    _, _, llm = models
    image = CASES["wide_image"][0]
    text = llm.processor.render_chat([{"role": "user", "content": [{"type": "image"}]}])
    raw = llm.processor.process(prompt=text, images=[image])
    part = {"type": "image", "image": image}
    chat = llm.processor.process(messages=[{"role": "user", "content": [part]}])
    assert raw.token_ids[-len(chat.token_ids) :] == chat.token_ids


def test_mixed_batch_matches_reference(models):
    _, ref, llm = models
    cases = list(CASES.values()) * 2
    refs = [ref.greedy(images, "Describe.", STEPS) for images in cases]
    refs.append(ref.greedy([], "Hello, how are you today?", STEPS))
    prompts = [{"messages": messages(images)} for images in cases]
    prompts.append([{"role": "user", "content": "Hello, how are you today?"}])
    assert_batch_matches(llm, prompts, refs, STEPS)


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill_splits_images_and_matches(models, budget):
    path, ref, _ = models
    llm = LLM(
        str(path), dtype="float32", device="cpu", num_kv_blocks=256,
        max_num_batched_tokens=budget,
    )  # fmt: skip
    images = CASES["three_images"]
    tokens, logits = ref.greedy(images, "Describe.", STEPS)
    assert_single_matches(llm, {"messages": messages(images)}, tokens, logits, STEPS, f"{budget}")
    assert llm.engine.runner.encoder_cache.misses == 3  # each image encoded once


def test_video_is_refused_by_name(models):
    _, _, llm = models
    frames = [random_image(40, 30, i) for i in range(4)]
    msgs = [{"role": "user", "content": [{"type": "video", "video": frames}]}]
    with pytest.raises(InvalidInputError, match="video"):
        llm.processor.process(messages=msgs)
