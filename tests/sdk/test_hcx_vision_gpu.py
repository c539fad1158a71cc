"""HyperCLOVA X SEED Vision on CUDA: Triton attention with decode and prefill CUDA graphs, the
SigLIP tower through the varlen kernel, the C-Abstractor's convolutions and the images staged on
the device; fp32 against the CPU reference of `hcx_reference.py` (greedy tokens identical,
logits within 1e-4) for each image case and a mixed batch, replayed twice; bf16 near fp32."""

import pytest
import torch

from polymodal import LLM, SamplingParams
from tests.helpers import record_logits, tiny_checkpoint
from tests.sdk.hcx_reference import HCXReference
from tests.sdk.test_hcx_vision_parity import ARCHS, CASES, STEPS, messages
from tests.sdk.vl_reference import assert_batch_matches, assert_single_matches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = tiny_checkpoint(tmp_path_factory, request.param)
    llm = LLM(str(path), dtype="float32", device="cuda", attention_backend="triton", warmup=True)
    return path, HCXReference(path), llm


@pytest.mark.parametrize("case", list(CASES))
def test_cases_match_the_reference(models, case):
    _, ref, llm = models
    assert llm.engine.runner.graphs is not None  # decode graphs captured
    tokens, logits = ref.greedy(CASES[case], "Describe.", STEPS)
    prompt = {"messages": messages(CASES[case])}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, case)
    assert_single_matches(llm, prompt, tokens, logits, STEPS, case + " again")  # cache + graphs


def test_mixed_batch_matches_the_reference(models):
    _, ref, llm = models
    cases = list(CASES.values())
    refs = [ref.greedy(images, "Describe.", STEPS) for images in cases]
    assert_batch_matches(llm, [{"messages": messages(im)} for im in cases], refs, STEPS)


def test_bf16_runs_near_fp32(models):
    path, _, fp32 = models
    llm = LLM(str(path), dtype="bfloat16", device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"messages": messages(CASES["three_images"])}
    fast_seen, ref_seen = record_logits(llm.engine), record_logits(fp32.engine)
    assert len(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    fp32.generate(prompt, params, use_tqdm=False)
    torch.testing.assert_close(fast_seen[0].float(), ref_seen[0].float(), atol=0.15, rtol=0)
