"""LLaVA-OneVision end to end (processor + SigLIP tower + projector + Qwen2 decoder) vs
transformers, fp32 on the CPU: identical greedy tokens, logits within 1e-4. One image (a small
one, and one whose 4 x 4 tile map is resampled to nine tiles' worth), several images (one view
each), a video, images with a video, a mixed batch with a text-only prompt, and chunked prefill
that splits the media across steps; the tower read at its last layer, and at two layers
concatenated. The reference gets a prompt's images as one sample (`apply_chat_template`'s
nesting: several images are each one view)."""

import pytest
import torch
import transformers as tf

from polymodal import LLM
from tests.helpers import tiny_checkpoint
from tests.sdk.vl_reference import (
    assert_batch_matches,
    assert_single_matches,
    hf_greedy,
    hf_sample_inputs,
    media_messages,
    random_image,
)

STEPS = 6
VIDEO = [random_image(50, 40, 10 + i) for i in range(4)]
THREE = [random_image(28, 28, 1), random_image(90, 40, 2), random_image(9, 50, 3)]
CASES = {  # (images, videos)
    "one_image": ([random_image(64, 48, 0)], []),
    "resampled_image": ([random_image(140, 140, 1)], []),
    "three_images": (THREE, []),
    "video": ([], [VIDEO]),
    "image_and_video": ([random_image(100, 60, 4)], [VIDEO[:3]]),
    "two_images_and_video": ([random_image(20, 200, 5), random_image(300, 31, 6)], [VIDEO]),
}
# (the seed: random weights whose greedy paths never write the image or video token, which the
# reference would take for a placeholder)
VARIANTS = {"last_layer": {}, "two_layers": {"vision_feature_layer": [-3, -1], "seed": 1}}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llava_onevision", **VARIANTS[request.param])
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=256)
    return path, hf, processor, llm


def reference(models, images, videos):
    """transformers' greedy tokens and logits, the prompt's images nested as one sample."""
    _, hf, processor, _ = models
    tokens, logits = hf_greedy(hf, hf_sample_inputs(processor, images, videos), STEPS)
    media = {hf.config.image_token_id, hf.config.video_token_id}
    assert not media & set(tokens[:-1]), "the reference wrote a media token: pick another seed"
    return tokens, logits


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_transformers(models, case):
    tokens, logits = reference(models, *CASES[case])
    prompt = {"messages": media_messages(*CASES[case])}
    assert_single_matches(models[3], prompt, tokens, logits, STEPS, case)


def test_resampled_image_takes_fewer_tokens(models):
    """The 4 x 4 grid's 20 x 20 map becomes 15 x 15 (+ newlines) after the base view."""
    prompt = media_messages(*CASES["resampled_image"])
    item = models[3].processor.process(messages=prompt).mm_items[0]
    assert item.data["tile_layout"].tolist()[2:] == [0, 20, 0, 20, 15, 15]
    assert item.num_embeds == 25 + 15 * 16


def test_mixed_batch_matches_transformers(models):
    cases = list(CASES.values()) + [([], [])]  # and a text-only prompt
    refs = [reference(models, *case) for case in cases]
    prompts = [{"messages": media_messages(*case)} for case in cases]
    assert_batch_matches(models[3], prompts, refs, STEPS)


@pytest.mark.parametrize("budget", [5, 16])
def test_chunked_prefill_splits_media_and_matches(models, budget):
    llm = LLM(
        str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256,
        max_num_batched_tokens=budget,
    )  # fmt: skip
    case = CASES["two_images_and_video"]
    tokens, logits = reference(models, *case)
    prompt = {"messages": media_messages(*case)}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, f"budget {budget}")
    assert llm.engine.runner.encoder_cache.misses == 3  # each item encoded once


def test_prefix_cache_tells_videos_apart(models):
    """The same video again reuses its blocks (a prefix hit past the video's first slot);
    another video of the same size and length under the same text shares only the tokens
    before it; each matches transformers."""
    llm = LLM(str(models[0]), dtype="float32", device="cpu", num_kv_blocks=256)
    kv = llm.engine.scheduler.kv
    other = [random_image(50, 40, 30 + i) for i in range(4)]
    start = llm.process({"messages": media_messages([], [VIDEO])}).mm_items[0].slot_start
    for label, video in (("first", VIDEO), ("again", VIDEO), ("other", other)):
        tokens, logits = reference(models, [], [video])
        before = kv.num_hit_tokens
        prompt = {"messages": media_messages([], [video])}
        assert_single_matches(llm, prompt, tokens, logits, STEPS, label)
        hits = kv.num_hit_tokens - before
        assert hits > start + 16 if label == "again" else hits <= start, (label, hits)
