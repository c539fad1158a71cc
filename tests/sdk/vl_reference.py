"""Shared reference runs for the multimodal families: transformers' processor + model, greedy by
full re-forwarding, and the checks every family's parity test makes against it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from polymodal import SamplingParams
from tests.helpers import record_logits, record_logits_by_request

# per-token type rows the processors return, extended with text (0) as tokens are generated
TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")


def hf_and_ours(tmp_path_factory, arch: str):
    """(transformers' fp32 model, its processor, our fp32 CPU `LLM`) on the tiny `arch`
    checkpoint."""
    import transformers as tf

    from polymodal import LLM
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, arch)
    hf = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    return hf, processor, LLM(str(path), dtype="float32", device="cpu", num_kv_blocks=256)


def random_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def messages(images, text="Describe.") -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def hf_inputs(processor, msgs, images, **kwargs) -> dict:
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=images or None, return_tensors="pt", **kwargs))


def media_messages(images, videos, text="Describe.") -> list[dict]:
    """A user turn with images, then videos, then text (a text-only turn without media)."""
    if not images and not videos:
        return [{"role": "user", "content": "Hi!"}]
    parts = [{"type": "image", "image": im} for im in images]
    parts += [{"type": "video", "video": v} for v in videos]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def hf_sample_inputs(processor, images, videos) -> dict:
    """transformers' inputs for `media_messages(images, videos)` with the prompt's images as one
    sample, as `apply_chat_template` nests them (LLaVA-OneVision: several images -> one view
    each) and each video a list of frames."""
    msgs = media_messages(images, videos)
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return dict(
        processor(
            text=[text],
            images=[images] if images else None,
            videos=[list(v) for v in videos] or None,
            return_tensors="pt",
        )
    )


def hf_greedy(hf, inputs: dict, steps: int):
    """Greedy tokens and the fp32 logits that chose each (the whole prompt re-run each step)."""
    inputs = dict(inputs)
    if "pixel_values" in inputs:  # Llama 4's processor gives bfloat16; the model takes its dtype
        inputs["pixel_values"] = inputs["pixel_values"].to(hf.dtype)
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask", None)
    tokens, logits_seen = [], []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(input_ids=ids, **inputs).logits[0, -1].float()
        logits_seen.append(logits)
        tokens.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
        for key in TYPE_KEYS:  # a generated token is text: type 0
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], inputs[key].new_zeros(1, 1)], dim=1)
        if "cross_attention_mask" in inputs:  # Mllama: a new token sees what the last one saw
            mask = inputs["cross_attention_mask"]
            inputs["cross_attention_mask"] = torch.cat([mask, mask[:, -1:]], dim=1)
    return tokens, logits_seen


def assert_single_matches(llm, prompt, ref_tokens, ref_logits, steps: int, what: str = "") -> None:
    """`prompt` alone through `llm`: the reference's greedy tokens, logits within 1e-4."""
    seen = record_logits(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref_tokens, f"{what}: greedy tokens differ"
    for step in range(steps):
        diff = (seen[step][0].cpu() - ref_logits[step]).abs().max().item()
        assert diff <= 1e-4, f"{what} step {step}: max abs logit diff {diff:.2e}"


def assert_batch_matches(llm, prompts, refs, steps: int) -> None:
    """Prompts run together: each gives its reference's tokens and logits (within 1e-4)."""
    seen = record_logits_by_request(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    ids = [llm.submit(p, params) for p in prompts]
    final = {o.request_id: o for o in llm.run(ids)}
    for i, (rid, (ref_tokens, ref_logits)) in enumerate(zip(ids, refs)):
        assert final[rid].outputs[0].token_ids == ref_tokens, f"prompt {i}: tokens differ"
        for step in range(steps):
            diff = (seen[rid][step].cpu() - ref_logits[step]).abs().max().item()
            assert diff <= 1e-4, f"prompt {i} step {step}: max abs logit diff {diff:.2e}"
