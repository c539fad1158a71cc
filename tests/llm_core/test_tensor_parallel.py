"""Tensor parallelism on the CPU (gloo, 2 and 4 ranks): fp32 greedy tokens identical to one
rank and logits within 1e-5, kv heads split or replicated; clear errors; no process left."""

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig, resolve_model
from polymodal.llm_core.errors import EngineDeadError, InvalidInputError
from polymodal.llm_core.executor import check_tensor_parallel
from polymodal.llm_core.layers.parallel import vocab_rows
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits_by_request, tiny_checkpoint

# A worker that hangs would otherwise hold the run; every engine closes its workers itself.
pytestmark = pytest.mark.timeout(300)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 17], [5]]
# name: (tiny arch, overrides, ranks). Tiny shapes: 4 query heads, 2 kv heads, vocab 480.
CASES = {
    "llama-2": ("llama", {}, 2),  # kv heads split 1 + 1
    "llama-4-kv1": ("llama", {"num_key_value_heads": 1}, 4),  # one kv head on all 4 ranks
    "qwen2-4": ("qwen2", {}, 4),  # 2 kv heads on 4 ranks (replicated), q/k/v biases
    "qwen2-2-tied": ("qwen2", {"tie_word_embeddings": True, "vocab_size": 479}, 2),  # padded
    "phi3-2": ("phi3", {}, 2),  # q/k/v and gate/up stored fused in the checkpoint
}


def _run(path, tp: int, prompt_logprobs: int | None = None):
    """Greedy tokens, the logits behind each and the prompt logprobs, per request, with the
    prompts run together (a small token budget: chunked prefill, mixed steps)."""
    engine = Engine(
        str(path), dtype="float32", tensor_parallel_size=tp, skip_tokenizer_init=True,
        max_model_len=256, max_num_batched_tokens=16,
    )  # fmt: skip
    try:
        seen = record_logits_by_request(engine)
        free = engine.num_free_blocks
        for i, ids in enumerate(PROMPTS):
            params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            if i == 1 and prompt_logprobs:
                params = SamplingParams(
                    temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=prompt_logprobs
                )
            engine.add_request(ids, params, request_id=str(i))
        final = engine.run_until_done()
        assert engine.num_free_blocks == free
    finally:
        engine.close()
    _assert_no_workers(engine)
    return (
        {k: v.outputs[0].token_ids for k, v in final.items()},
        {k: torch.stack(v) for k, v in seen.items()},
        final["1"].prompt_logprobs,
    )


def _assert_no_workers(engine) -> None:
    if engine.executor is not None:
        assert not any(p.is_alive() for p in engine.executor.procs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokens_and_logits_match_one_rank(tmp_path_factory, case):
    arch, overrides, tp = CASES[case]
    path = tiny_checkpoint(tmp_path_factory, arch, **overrides)
    logprobs = 3 if case == "llama-2" else None  # the LM head's gather on prompt-logprob rows
    tokens, logits, prompt_lp = _run(path, 1, logprobs)
    tp_tokens, tp_logits, tp_prompt_lp = _run(path, tp, logprobs)
    assert tp_tokens == tokens
    for key in logits:
        assert tp_logits[key].shape == logits[key].shape
        torch.testing.assert_close(tp_logits[key], logits[key], atol=1e-5, rtol=0)
    if logprobs:
        for ours, ref in zip(tp_prompt_lp[1:], prompt_lp[1:]):
            assert ours.keys() == ref.keys()
            assert max(abs(ours[t] - ref[t]) for t in ref) < 1e-5


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_qwen2_5_vl_matches_one_rank(tmp_path_factory):
    """The tower runs on rank 0 (replicated weights on every rank); its embeddings reach the
    others by broadcast. Two images, one prompt split over steps by the token budget."""
    from polymodal.processors.qwen_vl import QwenVLProcessor

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    processor = QwenVLProcessor.from_pretrained(path)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": _image(90, 60, 0)},
                {"type": "image", "image": _image(56, 84, 1)},
                {"type": "text", "text": "Describe."},
            ],
        }
    ]
    results = []
    for tp in (1, 2):
        engine = Engine(
            str(path), dtype="float32", tensor_parallel_size=tp, max_model_len=512,
            max_num_batched_tokens=32,
        )  # fmt: skip
        try:
            seen = record_logits_by_request(engine)
            prompt = processor.process(messages=messages)  # fresh items: staging mutates them
            engine.add_request(
                prompt.token_ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                request_id="vl", positions=prompt.positions, mrope_delta=prompt.mrope_delta,
                mm_items=prompt.mm_items,
            )  # fmt: skip
            out = engine.run_until_done()["vl"]
        finally:
            engine.close()
        _assert_no_workers(engine)
        results.append((out.outputs[0].token_ids, torch.stack(seen["vl"])))
    (tokens, logits), (tp_tokens, tp_logits) = results
    assert tp_tokens == tokens
    torch.testing.assert_close(tp_logits, logits, atol=1e-5, rtol=0)


# ---- errors: raised before any process starts --------------------------------------------
def test_heads_not_divisible(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llama")
    with pytest.raises(InvalidInputError, match="num_attention_heads=4"):
        Engine(str(path), tensor_parallel_size=3, skip_tokenizer_init=True)


def test_kv_heads_neither_divide(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llama", num_attention_heads=8, num_key_value_heads=4)
    cfg = EngineConfig(tensor_parallel_size=8)
    mc, device, *_ = resolve_model(path, cfg)
    mc.num_kv_heads = 3
    with pytest.raises(InvalidInputError, match="num_key_value_heads=3"):
        check_tensor_parallel(mc, cfg, device)


def test_more_ranks_than_gpus(tmp_path_factory, monkeypatch):
    path = tiny_checkpoint(tmp_path_factory, "llama")
    cfg = EngineConfig(tensor_parallel_size=2)
    mc, *_ = resolve_model(path, cfg)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InvalidInputError, match="only 1 CUDA device"):
        check_tensor_parallel(mc, cfg, torch.device("cuda"))


def test_family_without_tensor_parallel(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "exaone4")  # subclasses Llama: not inherited
    with pytest.raises(InvalidInputError, match="Exaone4ForCausalLM does not support tensor"):
        Engine(str(path), tensor_parallel_size=2, skip_tokenizer_init=True)


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_size(tmp_path_factory, bad):
    path = tiny_checkpoint(tmp_path_factory, "llama")
    with pytest.raises(InvalidInputError, match="tensor_parallel_size"):
        Engine(str(path), tensor_parallel_size=bad, skip_tokenizer_init=True)


def test_a_dead_worker_fails_the_step_not_hangs(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "llama")
    engine = Engine(str(path), dtype="float32", tensor_parallel_size=2, skip_tokenizer_init=True)
    try:
        worker = engine.executor.procs[0]
        worker.kill()
        worker.join(10)
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=3))
        with pytest.raises(EngineDeadError, match="rank 1 exited"):
            engine.run_until_done()
    finally:
        engine.close()
    _assert_no_workers(engine)


def test_vocab_rows_pad_the_last_rank():
    table = torch.arange(10.0).view(5, 2)
    assert torch.equal(vocab_rows(table, 3, 3), torch.tensor([[6.0, 7], [8, 9], [0, 0]]))


def test_llm_and_cli_take_tensor_parallel_size(tmp_path_factory):
    import argparse

    from polymodal import LLM
    from polymodal.engine_args import add_engine_arguments, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_kwargs(parser.parse_args(["--tensor-parallel-size", "2"])) == {
        "device": "auto", "dtype": "auto", "tensor_parallel_size": 2,
    }  # fmt: skip
    path = str(tiny_checkpoint(tmp_path_factory, "llama"))
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    texts = []
    for tp in (1, 2):
        llm = LLM(path, device="cpu", dtype="float32", tensor_parallel_size=tp)
        try:
            texts.append([o.outputs[0].token_ids for o in llm.generate(["hi", "a b c"], greedy)])
        finally:
            llm.engine.close()
    assert texts[0] == texts[1]
