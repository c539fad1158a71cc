"""Phi-4-multimodal on CUDA, both checkpoint layouts (transformers' and the hub's): Triton
attention, decode and prefill CUDA graphs, the SigLIP crops and the conformer on the device, the
vision / speech LoRA through the segmented kernels; fp32 against transformers with the request's
adapter merged (greedy tokens identical, logits within 1e-4) for text, image, audio and both,
alone and as one mixed batch; bf16 runs (its first logits near the fp32 run's)."""

import pytest
import torch
import transformers as tf

from polymodal import LLM, SamplingParams
from polymodal.llm_core.models.phi4mm import Phi4MMForCausalLM
from polymodal.llm_core.models.phi4mm_tiny import write_hub_layout
from tests.helpers import record_logits, tiny_checkpoint
from tests.sdk.test_phi4mm_parity import CASES, _merged, _messages
from tests.sdk.vl_reference import assert_batch_matches, assert_single_matches, hf_greedy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = tiny_checkpoint(tmp_path_factory, "phi4mm")
    hf = tf.Phi4MultimodalForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    processor = tf.AutoProcessor.from_pretrained(path)
    merged = {name: _merged(hf, path, name) for name in (None, "vision", "speech")}
    refs = {case: _reference(merged, processor, case) for case in CASES}
    return path, refs


@pytest.fixture(scope="module", params=["transformers", "hub"])
def llm(request, reference, tmp_path_factory):
    path = reference[0]
    if request.param == "hub":
        path = write_hub_layout(path, tmp_path_factory.mktemp("phi4mm_hub") / "ckpt")
    return LLM(str(path), dtype="float32", device="cuda", attention_backend="triton", warmup=True)


def _reference(merged, processor, case):
    images, clips = CASES[case]
    parts = [{"type": "image"}] * len(images) + [{"type": "audio"}] * len(clips)
    msgs = [{"role": "user", "content": parts + [{"type": "text", "text": "Describe."}]}]
    text = processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, audio=clips or None,
                       return_tensors="pt")  # fmt: skip
    kinds = ["image"] * len(images) + ["audio"] * len(clips)
    adapter = Phi4MMForCausalLM.modality_adapter([type("Item", (), {"modality": m}) for m in kinds])
    return hf_greedy(merged[adapter], dict(inputs), STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_single_request_matches_transformers(reference, llm, case):
    assert llm.engine.runner.graphs is not None  # decode graphs captured
    tokens, logits = reference[1][case]
    prompt = {"messages": _messages(*CASES[case])}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, case)
    # again: the encoder cache hit and the replayed graphs give the same answer
    assert_single_matches(llm, prompt, tokens, logits, STEPS, f"{case} (again)")


def test_mixed_batch_matches_transformers(reference, llm):
    """Text, image, audio and image + audio (no adapter, vision, speech) in the same steps."""
    cases = list(CASES) * 2
    prompts = [{"messages": _messages(*CASES[case])} for case in cases]
    assert_batch_matches(llm, prompts, [reference[1][case] for case in cases], STEPS)


def test_bf16_runs_with_graphs(llm):
    model_dir = llm.engine.runner.model.model_dir
    fast = LLM(str(model_dir), dtype="bfloat16", device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"messages": _messages(*CASES["image_audio"])}
    fast_seen, ref_seen = record_logits(fast.engine), record_logits(llm.engine)
    out = fast.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    llm.generate(prompt, params, use_tqdm=False)
    assert len(out) == 4
    torch.testing.assert_close(fast_seen[0].float(), ref_seen[0].float(), atol=0.15, rtol=0)
