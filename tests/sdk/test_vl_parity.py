"""Qwen2-VL / Qwen2.5-VL end to end (processor + tower + decoder) vs transformers, fp32 CPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal import SamplingParams
from tests.helpers import record_logits
from tests.sdk.vl_reference import hf_and_ours

STEPS = 8


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _video(n, w, h, seed):
    return [_image(w, h, seed + i) for i in range(n)]


CASES = {
    "one_image": ([_image(64, 48, 0)], []),
    "three_images": ([_image(56, 56, 1), _image(90, 40, 2), _image(40, 100, 3)], []),
    "one_video": ([], [_video(4, 56, 42, 10)]),
    "image_and_video": ([_image(60, 70, 4)], [_video(4, 48, 48, 20)]),
}


def _messages(images, videos, text="Describe."):
    parts = [{"type": "image", "image": im} for im in images]
    parts += [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _hf_greedy(hf, processor, images, videos, steps):
    msgs = _messages(images, videos)
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(
        text=[text],
        images=images or None,
        videos=videos or None,
        return_tensors="pt",
        do_sample_frames=False,
    )
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    tokens, logits_seen = [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(input_ids=ids, **inputs).logits[0, -1].float()
        logits_seen.append(logits)
        tokens.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
        if "mm_token_type_ids" in inputs:  # text token: type 0
            types = inputs["mm_token_type_ids"]
            inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, 1)], dim=1)
    return tokens, logits_seen


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def models(request, tmp_path_factory):
    return hf_and_ours(tmp_path_factory, request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_transformers(models, case):
    hf, processor, llm = models
    images, videos = CASES[case]
    ref_tokens, ref_logits = _hf_greedy(hf, processor, images, videos, STEPS)
    seen = record_logits(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    out = llm.generate({"messages": _messages(images, videos)}, params)[0]
    assert out.outputs[0].token_ids == ref_tokens
    for step in range(STEPS):
        diff = (seen[step][0] - ref_logits[step]).abs().max().item()
        assert diff <= 1e-4, f"{case} step {step}: max abs logit diff {diff:.2e}"


def test_batch_of_eight_mixed_requests_matches_singles(models):
    hf, processor, llm = models
    cases = list(CASES.values()) * 2
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    outs = llm.generate([{"messages": _messages(i, v)} for i, v in cases], params)
    for (images, videos), out in zip(cases, outs):
        ref_tokens, _ = _hf_greedy(hf, processor, images, videos, STEPS)
        assert out.outputs[0].token_ids == ref_tokens
