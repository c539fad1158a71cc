"""Gemma 3 with vision end to end (processor + SigLIP + projector + decoder) vs transformers,
fp32 on the CPU: one image, several, pan-and-scan crops, mixed batches, and chunk budgets that
would split an image (its tokens attend to each other both ways: it must run in one step)."""

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
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}

CASES = {
    "one_image": ([random_image(64, 48, 0)], {}),
    "three_images": (
        [random_image(28, 28, 1), random_image(90, 40, 2), random_image(9, 50, 3)],
        {},
    ),
    "pan_and_scan": ([random_image(80, 30, 4), random_image(30, 30, 5)], PAN_AND_SCAN),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "gemma3_vl")
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    return path, hf, processor


@pytest.fixture(scope="module")
def llm(models):
    return LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256)


def _reference(models, case):
    _, hf, processor = models
    images, options = CASES[case]
    return hf_greedy(hf, hf_inputs(processor, messages(images), images, **options), STEPS)


def _prompt(case):
    images, options = CASES[case]
    return {"messages": messages(images), "mm_processor_kwargs": options}


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_transformers(models, llm, case):
    tokens, logits = _reference(models, case)
    assert_single_matches(llm, _prompt(case), tokens, logits, STEPS, case)


def test_mixed_batch_matches_transformers(models, llm):
    """Images of several sizes, crops and a text-only prompt, all in one engine run."""
    cases = list(CASES) * 2
    refs = [_reference(models, case) for case in cases]
    text = [{"role": "user", "content": "Hello, how are you today?"}]
    _, hf, processor = models
    refs.append(hf_greedy(hf, hf_inputs(processor, text, []), STEPS))
    assert_batch_matches(llm, [_prompt(c) for c in cases] + [text], refs, STEPS)


@pytest.mark.parametrize("budget", [7, 12, 33])
def test_chunk_budget_never_splits_an_image(models, budget):
    """Token budgets that would cut each image's 4 soft tokens (or a crop run) in two: the
    output stays the reference's, and no step ends inside an image."""
    llm = LLM(
        str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256,
        max_num_batched_tokens=budget,
    )  # fmt: skip
    steps = []
    scheduler = llm.engine.scheduler
    original = scheduler.schedule

    def schedule():
        out = original()
        steps.extend(
            (r, r.num_computed_tokens, n) for r, n in zip(out.requests, out.num_new_tokens)
        )
        return out

    scheduler.schedule = schedule
    for case in ("three_images", "pan_and_scan"):
        tokens, logits = _reference(models, case)
        assert_single_matches(llm, _prompt(case), tokens, logits, STEPS, f"{case}@{budget}")
    for req, start, n in steps:
        for a, b in req.atomic_spans:
            assert not (a < start + n < b), f"a step ended at {start + n} inside image [{a}, {b})"
            assert not (a < start < b), f"a step started at {start} inside image [{a}, {b})"


def test_padded_prefill_steps_keep_image_ranges(models):
    """What a prefill CUDA graph runs (`PrefillGraphs`, eager on the CPU: steps padded to a
    token bucket and 8 sequences), with each image's bidirectional key ranges as the graph's
    static input: the same tokens as transformers for images, crops and a text-only prompt in
    one run, and the padded path taken for the image steps."""
    from polymodal.llm_core.prefill_graphs import PrefillGraphs

    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256)
    runner = llm.engine.runner
    runner.prefill_graphs = PrefillGraphs(
        runner.model, runner.kv_caches, 64, runner.kv_caches[0].shape[1], runner.uses_mrope,
        runner.num_kv_groups, media_ranges=True,
    )  # fmt: skip
    padded = runner.prefill_graphs  # not captured: run() pads and runs the forward eagerly
    calls = []
    original = padded._copy_ranges
    padded._copy_ranges = lambda r, rc, n, b: (calls.append(r is not None), original(r, rc, n, b))
    for case in CASES:
        tokens, logits = _reference(models, case)
        assert_single_matches(llm, _prompt(case), tokens, logits, STEPS, case)
    text = [{"role": "user", "content": "Hello, how are you today?"}]
    _, hf, processor = models
    tokens, logits = hf_greedy(hf, hf_inputs(processor, text, []), STEPS)
    assert_single_matches(llm, {"messages": text}, tokens, logits, STEPS, "text")
    assert any(calls) and not all(calls)  # image steps with ranges, the text prompt without
