"""Llama 4 with vision end to end (processor + tile tower + pixel shuffle + projector + the Llama 4
decoder) vs transformers, fp32 on the CPU: one image (tiles + global view), several, extreme
aspect ratios, a mixed batch with a text-only prompt, and chunk budgets that split images across
steps (transformers' Llama 4 attends causally over image tokens: a split is allowed and must
not change anything).

Reference version: transformers 5.17 (pinned in CI; 5.23 and 5.25 agree). transformers 5.24's
`Llama4ForConditionalGeneration.forward` reads `image_outputs` from its text model's output,
which has none: every call raises AttributeError, so these tests skip under 5.24 only (its
processor, vision model and text model still match ours: tests/processors, tests/encoders,
tests/llm_core/test_llama4.py run under it)."""

import pytest
import torch
import transformers as tf
from packaging.version import Version

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

pytestmark = pytest.mark.skipif(
    Version(tf.__version__).release[:2] == (5, 24),
    reason="transformers 5.24's Llama4ForConditionalGeneration.forward raises AttributeError "
    "(image_outputs); 5.17, 5.23 and 5.25 agree with ours",
)

STEPS = 6
CASES = {
    "one_image": [random_image(64, 48, 0)],  # 2x2 tiles + the global view
    "three_images": [random_image(28, 28, 1), random_image(90, 40, 2), random_image(9, 50, 3)],
    "tall_and_wide": [random_image(20, 200, 4), random_image(300, 31, 5)],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llama4_vl")
    hf = tf.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=256)
    return path, hf, processor, llm


def _reference(models, images):
    _, hf, processor, _ = models
    return hf_greedy(hf, hf_inputs(processor, messages(images), images), STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_transformers(models, case):
    tokens, logits = _reference(models, CASES[case])
    prompt = {"messages": messages(CASES[case])}
    assert_single_matches(models[3], prompt, tokens, logits, STEPS, case)


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
    """Budgets below one tile's 4 tokens and below one image: steps end inside images (their
    attention is causal), each image is encoded once, and the output is the reference's."""
    llm = LLM(
        str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256,
        max_num_batched_tokens=budget,
    )  # fmt: skip
    ends = []
    scheduler = llm.engine.scheduler
    original = scheduler.schedule

    def schedule():
        out = original()
        ends.extend(r.num_computed_tokens + n for r, n in zip(out.requests, out.num_new_tokens))
        return out

    scheduler.schedule = schedule
    images = CASES["three_images"]
    tokens, logits = _reference(models, images)
    prompt = {"messages": messages(images)}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, f"budget {budget}")
    assert llm.engine.runner.encoder_cache.misses == 3  # each image encoded once
    spans = [(it.slot_start, it.slot_end) for it in llm.process(prompt).mm_items]
    assert any(a < end < b for end in ends for a, b in spans), "no step ended inside an image"


def test_prefix_and_encoder_cache_hits_keep_the_output(models):
    """The same image prompt again: prefix-cache blocks hit (the chunked groups serve only what
    their next query sees) and the encoder is not rerun; the output stays the reference's."""
    llm = models[3]
    tokens, logits = _reference(models, CASES["tall_and_wide"])
    prompt = {"messages": messages(CASES["tall_and_wide"])}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, "first")
    kv, cache = llm.engine.scheduler.kv, llm.engine.runner.encoder_cache
    hits, misses = kv.num_hit_tokens, cache.misses
    assert_single_matches(llm, prompt, tokens, logits, STEPS, "again")
    assert kv.num_hit_tokens > hits and cache.misses == misses
