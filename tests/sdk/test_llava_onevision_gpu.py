"""LLaVA-OneVision on CUDA: Triton attention, decode and prefill CUDA graphs, the SigLIP tower
through the varlen Triton kernel, media staged on the device; fp32 against transformers
(greedy tokens identical, logits within 1e-4) for one image, a mixed batch of several images,
videos, images with a video and a text-only prompt, and a chunk budget that splits the media;
a bf16 run stays near the fp32 one."""

import pytest
import torch
import transformers as tf

from polymodal import LLM, SamplingParams
from tests.helpers import record_logits, tiny_checkpoint
from tests.sdk.vl_reference import (
    assert_batch_matches,
    assert_single_matches,
    hf_greedy,
    hf_sample_inputs,
    media_messages,
    random_image,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
STEPS = 6
VIDEO = [random_image(50, 40, 10 + i) for i in range(4)]
CASES = [  # (images, videos)
    ([random_image(140, 140, 1)], []),  # a 4 x 4 grid, its map resampled
    ([random_image(28, 28, 1), random_image(90, 40, 2), random_image(9, 50, 3)], []),
    ([], [VIDEO]),
    ([random_image(100, 60, 4)], [VIDEO[:3]]),
    ([], []),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = tiny_checkpoint(tmp_path_factory, "llava_onevision")
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", device="cuda", attention_backend="triton", warmup=True)
    return path, hf, processor, llm


def _reference(models, images, videos):
    _, hf, processor, _ = models
    return hf_greedy(hf, hf_sample_inputs(processor, images, videos), STEPS)


def test_one_image_matches_transformers(models):
    llm = models[3]
    assert llm.engine.runner.graphs is not None  # decode graphs captured
    tokens, logits = _reference(models, *CASES[0])
    prompt = {"messages": media_messages(*CASES[0])}
    assert_single_matches(llm, prompt, tokens, logits, STEPS)
    # again: the encoder cache hits, replayed graphs give the same answer
    assert_single_matches(llm, prompt, tokens, logits, STEPS)


def test_mixed_batch_matches_transformers(models):
    refs = [_reference(models, *case) for case in CASES]
    prompts = [{"messages": media_messages(*case)} for case in CASES]
    assert_batch_matches(models[3], prompts, refs, STEPS)


def test_chunked_prefill_matches_transformers(models):
    llm = LLM(
        str(models[0]), dtype="float32", device="cuda", attention_backend="triton",
        max_num_batched_tokens=16,
    )  # fmt: skip
    tokens, logits = _reference(models, *CASES[3])
    prompt = {"messages": media_messages(*CASES[3])}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, "budget 16")


def test_bf16_runs_with_graphs(models):
    """bf16 (the GEMV, the Triton pixel kernel for staging): the first step's logits stay
    near the fp32 engine's."""
    path, _, _, fp32 = models
    llm = LLM(str(path), dtype="bfloat16", device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"messages": media_messages(*CASES[3])}
    fast_seen, ref_seen = record_logits(llm.engine), record_logits(fp32.engine)
    fast = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    fp32.generate(prompt, params, use_tqdm=False)
    assert len(fast) == 4
    torch.testing.assert_close(fast_seen[0].float(), ref_seen[0].float(), atol=0.15, rtol=0)
