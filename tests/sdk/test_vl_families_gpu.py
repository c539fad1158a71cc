"""The multimodal families on CUDA: Triton attention (Gemma 3's bidirectional image runs in the
prefill kernel's key ranges), decode and prefill CUDA graphs, the towers through the varlen
Triton kernel, media staged on the device; fp32 against transformers (greedy tokens identical,
logits within 1e-4), one image and a mixed batch; bf16 runs (its first logits near the fp32
run's). Mllama's images reach the decoder through the cross KV cache (Triton cross prefill and
decode, cross tables in the decode graphs)."""

import pytest
import torch
import transformers as tf
from packaging.version import Version

from polymodal import LLM, SamplingParams
from tests.helpers import tiny_checkpoint
from tests.sdk.vl_reference import (
    assert_batch_matches,
    assert_single_matches,
    hf_greedy,
    hf_inputs,
    messages,
    random_image,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# transformers 5.24's Llama4ForConditionalGeneration.forward raises (test_llama4_vl_parity.py)
_LLAMA4_REFERENCE = pytest.mark.skipif(
    Version(tf.__version__).release[:2] == (5, 24), reason="transformers 5.24's Llama 4 is broken"
)
ARCHS = [
    "gemma3_vl",
    "llava",
    "llava_next",
    "mistral3",
    "pixtral",
    "mllama",
    pytest.param("llama4_vl", marks=_LLAMA4_REFERENCE),
]
STEPS = 6
IMAGES = [random_image(64, 48, 0), random_image(90, 40, 2), random_image(9, 50, 3)]


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = tiny_checkpoint(tmp_path_factory, request.param)
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", device="cuda", attention_backend="triton", warmup=True)
    return path, hf, processor, llm


def _reference(models, images):
    _, hf, processor, _ = models
    return hf_greedy(hf, hf_inputs(processor, messages(images), images), STEPS)


def test_one_image_matches_transformers(models):
    llm = models[3]
    assert llm.engine.runner.graphs is not None  # decode graphs captured
    tokens, logits = _reference(models, IMAGES[:1])
    assert_single_matches(llm, {"messages": messages(IMAGES[:1])}, tokens, logits, STEPS)
    # again: the same image hits the encoder cache, replayed graphs give the same answer
    assert_single_matches(llm, {"messages": messages(IMAGES[:1])}, tokens, logits, STEPS)


def test_mixed_batch_matches_transformers(models):
    cases = [IMAGES[:1], IMAGES, IMAGES[1:], []]
    refs = [_reference(models, images) for images in cases]
    prompts = [{"messages": messages(images)} for images in cases]
    assert_batch_matches(models[3], prompts, refs, STEPS)


def test_bf16_runs_with_graphs(models):
    """bf16 (the GEMV, the Triton pixel kernel for staging, encoder graphs where a tower opts
    in): the first step's logits stay near the fp32 engine's."""
    from tests.helpers import record_logits

    path, _, _, fp32 = models
    llm = LLM(str(path), dtype="bfloat16", device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"messages": messages(IMAGES[:2])}
    fast_seen, ref_seen = record_logits(llm.engine), record_logits(fp32.engine)
    fast = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    fp32.generate(prompt, params, use_tqdm=False)
    assert len(fast) == 4
    torch.testing.assert_close(fast_seen[0].float(), ref_seen[0].float(), atol=0.15, rtol=0)


@pytest.mark.parametrize(
    "arch",
    ["gemma3_vl", "llava", "llava_next", "pixtral", "mistral3",
     pytest.param("llama4_vl", marks=_LLAMA4_REFERENCE)],
)  # fmt: skip
def test_tower_graph_replays_match_transformers(tmp_path_factory, arch):
    """Towers of fixed-size views (Gemma 3's crops, CLIP's views, Llama 4's tiles) captured per
    view count, Pixtral's / Mistral 3's per image size: the tower + projector captured on the
    second sighting and replayed after, each fresh image still equal to transformers."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = tiny_checkpoint(tmp_path_factory, arch)
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", device="cuda", attention_backend="triton", warmup=False)
    graphs = llm.engine.runner.model.vision.graphs
    assert graphs is not None
    for seed in range(4):  # eager, captured, replayed, replayed: same size, fresh pixels
        images = [random_image(60, 40, 50 + seed)]
        tokens, logits = hf_greedy(hf, hf_inputs(processor, messages(images), images), STEPS)
        prompt = {"messages": messages(images)}
        assert_single_matches(llm, prompt, tokens, logits, STEPS, f"image {seed}")
    assert len(graphs.graphs) == 1
