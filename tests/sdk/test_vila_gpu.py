"""VILA / NVILA on CUDA: Triton attention with decode and prefill CUDA graphs, the SigLIP tower
through the varlen kernel, media staged on the device; fp32 against the CPU reference of
`vila_reference.py` (greedy tokens identical, logits within 1e-4) for one image, several, a
video and a mixed batch, replayed twice; bf16 near fp32; and the full-size NVILA-8B
architecture (shipped config, random weights) taking a 64-frame 448x448 video in one request
with its temporal compression (64 frames -> 8 x 256 tokens)."""

import numpy as np
import pytest
import torch

from polymodal import LLM, SamplingParams
from polymodal.bench.vila_reference import VilaReference
from tests.helpers import record_logits, tiny_checkpoint
from tests.sdk.test_vila_parity import CASES, STEPS, messages
from tests.sdk.vl_reference import assert_batch_matches, assert_single_matches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", params=["nvila", "nvila_lite", "vila1.5"])
def models(request, tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    path = tiny_checkpoint(tmp_path_factory, request.param)
    llm = LLM(str(path), dtype="float32", device="cuda", attention_backend="triton", warmup=True)
    return path, VilaReference(path), llm


@pytest.mark.parametrize("case", list(CASES))
def test_cases_match_the_reference(models, case):
    _, ref, llm = models
    assert llm.engine.runner.graphs is not None  # decode graphs captured
    tokens, logits = ref.greedy(CASES[case] + ["Describe."], STEPS)
    prompt = {"messages": messages(CASES[case])}
    assert_single_matches(llm, prompt, tokens, logits, STEPS, case)
    assert_single_matches(llm, prompt, tokens, logits, STEPS, case + " again")  # cache + graphs


def test_mixed_batch_matches_the_reference(models):
    _, ref, llm = models
    cases = list(CASES.values())
    refs = [ref.greedy(parts + ["Describe."], STEPS) for parts in cases]
    assert_batch_matches(llm, [{"messages": messages(p)} for p in cases], refs, STEPS)


def test_bf16_runs_near_fp32(models):
    path, _, fp32 = models
    llm = LLM(str(path), dtype="bfloat16", device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompt = {"messages": messages(CASES["image_and_video"])}
    fast_seen, ref_seen = record_logits(llm.engine), record_logits(fp32.engine)
    assert len(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    fp32.generate(prompt, params, use_tqdm=False)
    torch.testing.assert_close(fast_seen[0].float(), ref_seen[0].float(), atol=0.15, rtol=0)


def test_nvila_8b_takes_64_frames_of_448(tmp_path):
    """The published architecture, random bf16 weights: 64 frames of 448x448 in one request,
    averaged in groups of 8 (TSP) into 8 x 256 video tokens, decoded on one GPU."""
    from polymodal.bench import BUILTIN
    from polymodal.bench.checkpoint import write_user_checkpoint

    path = write_user_checkpoint(BUILTIN["nvila-8b"], tmp_path / "nvila_8b")
    llm = LLM(str(path), dummy_weights=True, dtype="bfloat16", max_model_len=8192)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (448, 448, 3), dtype=np.uint8) for _ in range(64)]
    prompt = {"messages": messages([("video", frames)], "What happens?"), "num_frames": 64}
    processed = llm.processor.process(messages=prompt["messages"], num_frames=64)
    assert [item.num_embeds for item in processed.mm_items] == [8 * 256]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8
    assert len(out.prompt_token_ids) == len(processed.token_ids)
