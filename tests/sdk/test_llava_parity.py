"""LLaVA-family models end to end (processor + tower + projector + decoder) vs transformers:
LLaVA-1.5, LLaVA-NeXT, Mistral 3 and Pixtral-12B's LLaVA form,
fp32 on the CPU: one image, several, a mixed batch with a text-only prompt, and chunked
prefill that splits images across steps (their attention is causal, so a split is allowed and
must not change anything)."""

import pytest
import torch
import transformers as tf

from polymodal import LLM
from tests.helpers import tiny_checkpoint
from tests.sdk.vl_reference import (
    assert_batch_matches,
    assert_single_matches,
    hf_greedy,
    hf_inputs,
    messages,
    random_image,
)

STEPS = 6
ARCHS = ["llava", "llava_next", "mistral3", "pixtral"]
CASES = {
    "one_image": [random_image(64, 48, 0)],
    "three_images": [random_image(28, 28, 1), random_image(90, 40, 2), random_image(9, 50, 3)],
    "tall_and_wide": [random_image(20, 200, 4), random_image(300, 31, 5)],
}


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, request.param)
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=256)
    return path, hf, processor, llm


def _reference(models, images):
    _, hf, processor, _ = models
    return hf_greedy(hf, hf_inputs(processor, messages(images), images), STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_transformers(models, case):
    tokens, logits = _reference(models, CASES[case])
    assert_single_matches(models[3], {"messages": messages(CASES[case])}, tokens, logits, STEPS)


def test_mixed_batch_matches_transformers(models):
    cases = list(CASES.values()) * 2
    refs = [_reference(models, images) for images in cases]
    text = [{"role": "user", "content": "Hello, how are you today?"}]
    _, hf, processor, llm = models
    refs.append(hf_greedy(hf, hf_inputs(processor, text, []), STEPS))
    prompts = [{"messages": messages(images)} for images in cases] + [text]
    assert_batch_matches(llm, prompts, refs, STEPS)


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill_splits_images_and_matches(models, budget):
    llm = LLM(
        str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256,
        max_num_batched_tokens=budget,
    )  # fmt: skip
    tokens, logits = _reference(models, CASES["three_images"])
    prompt = {"messages": messages(CASES["three_images"])}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, f"budget {budget}")
    assert llm.engine.runner.encoder_cache.misses == 3  # each image encoded once
