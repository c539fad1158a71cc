"""Sleep mode (`LLM(enable_sleep_mode=True)`, `sleep(level)`, `wake_up(tags)`): every weight and
KV storage is freed while asleep and the outputs after waking equal those before (level 1: the
host copy; level 2: weights loaded again); what is refused, naming why. GPU: memory given back,
graphs captured again."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from polymodal import LLM, InvalidInputError, SamplingParams
from polymodal.llm_core.sleep import model_storages
from tests.helpers import tiny_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[15, 9, 33, 70, 11], list(range(20, 60))]  # no media placeholder ids (3-6)


def _llm(path, device="cpu", **kw):
    kw.setdefault("num_kv_blocks", 64)
    return LLM(str(path), dtype="float32", device=device, enable_sleep_mode=True, **kw)


def _tokens(llm, prompts=PROMPTS):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _freed(llm) -> bool:
    runner = llm.engine.runner
    kv = [t.untyped_storage().nbytes() for t in runner.kv_caches if t is not None]
    return not model_storages(runner.model, runner.device) and not any(kv)


def _checkpoint_weights(path: Path):
    for file in sorted(Path(path).glob("*.safetensors")):
        yield from load_file(file).items()


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "mixtral", "deepseek_v3", "qwen2_5_vl"])
def test_level_1_frees_everything_and_wakes_with_the_same_outputs(tmp_path_factory, arch):
    llm = _llm(tiny_checkpoint(tmp_path_factory, arch))
    before = _tokens(llm)
    _tokens(llm)  # the prefix cache holds both prompts now
    llm.sleep(level=1)
    assert llm.is_sleeping() and _freed(llm)
    llm.wake_up()
    assert not llm.is_sleeping()
    hits = llm.engine.scheduler.kv.num_hit_tokens
    assert _tokens(llm) == before
    assert llm.engine.scheduler.kv.num_hit_tokens == hits  # the cache was emptied by sleep


def test_level_2_weights_loaded_again_between_the_tags(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "qwen2")
    llm = _llm(path)
    before = _tokens(llm)
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    with pytest.raises(InvalidInputError, match="asleep"):
        llm.generate([[1, 2]], GREEDY, use_tqdm=False)  # the KV cache still sleeps
    llm.load_weights(_checkpoint_weights(path))
    llm.wake_up(["kv_cache"])
    assert _tokens(llm) == before


def test_a_draft_model_sleeps_with_the_engine(tmp_path_factory):
    """Speculative decoding with a draft model: its weights and KV are freed too; at level 2
    its weights come back from the host (`load_weights` loads the target's), so its drafts
    are still the target's own tokens."""
    path = tiny_checkpoint(tmp_path_factory, "qwen2")
    spec = {"method": "draft_model", "model": str(path), "num_speculative_tokens": 3}
    llm = _llm(path, speculative_config=spec)
    before = _tokens(llm)
    llm.sleep(level=2)
    draft = llm.engine.runner.draft
    assert not model_storages(draft.net, draft.device)
    assert not any(t.untyped_storage().nbytes() for t in draft.kv_caches)
    llm.wake_up(["weights"])
    llm.load_weights(_checkpoint_weights(path))
    llm.wake_up(["kv_cache"])
    spec = llm.engine.speculation
    drafted, accepted = spec.num_draft_tokens, spec.num_accepted_tokens
    assert _tokens(llm) == before
    assert spec.num_accepted_tokens - accepted == spec.num_draft_tokens - drafted > 0


def test_an_image_request_after_waking(tmp_path_factory):
    llm = _llm(tiny_checkpoint(tmp_path_factory, "qwen2_vl"), num_kv_blocks=128)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (56, 84, 3), np.uint8))
    prompt = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>What?",
              "multi_modal_data": {"image": image}}  # fmt: skip
    before = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.sleep()
    llm.wake_up()
    assert llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == before


def test_what_is_refused(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory, "qwen2")
    plain = LLM(str(path), device="cpu", num_kv_blocks=32)
    with pytest.raises(InvalidInputError, match="enable_sleep_mode=True"):
        plain.sleep()
    llm = _llm(path)
    with pytest.raises(InvalidInputError, match="level must be 1 or 2"):
        llm.sleep(level=3)
    request = llm.engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(InvalidInputError, match="while requests run"):
        llm.sleep()
    llm.engine.abort(request)
    llm.sleep()
    with pytest.raises(InvalidInputError, match="asleep already"):
        llm.sleep()
    with pytest.raises(InvalidInputError, match="asleep"):
        llm.engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(InvalidInputError, match=r"wake_up\(\['weights'\]\) first"):
        llm.load_weights(_checkpoint_weights(path))
    with pytest.raises(InvalidInputError, match="unknown tags"):
        llm.wake_up(["weights", "graphs"])
    llm.wake_up(["kv_cache"])
    assert llm.is_sleeping()  # the weights still sleep
    llm.wake_up()
    llm.wake_up()  # awake already: nothing to do
    assert len(_tokens(llm)) == 2


def test_out_of_memory_on_waking_leaves_the_engine_asleep(tmp_path_factory, monkeypatch):
    """The GPU's other tenant still holds the memory: wake_up says so, frees what it took,
    and a later wake_up works."""
    llm = _llm(tiny_checkpoint(tmp_path_factory, "qwen2"))
    before = _tokens(llm)
    llm.sleep()
    real, calls = torch.UntypedStorage.resize_, []

    def failing(storage, nbytes):
        calls.append(nbytes)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(storage, nbytes)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", failing)
    with pytest.raises(InvalidInputError, match="not enough device memory for the weights"):
        llm.wake_up()
    monkeypatch.setattr(torch.UntypedStorage, "resize_", real)
    assert llm.is_sleeping() and _freed(llm)
    llm.wake_up()
    assert _tokens(llm) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("level", [1, 2])
def test_gpu_memory_is_given_back_and_graphs_come_back(tmp_path_factory, level):
    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    llm = _llm(path, device="cuda", num_kv_blocks=4096)
    before = _tokens(llm)
    runner = llm.engine.runner
    held = sum(s.nbytes() for s in model_storages(runner.model, runner.device))
    held += sum(t.untyped_storage().nbytes() for t in {id(t): t for t in runner.kv_caches
                                                       if t is not None}.values())  # fmt: skip
    torch.cuda.synchronize()
    awake = torch.cuda.memory_reserved()
    llm.sleep(level=level)
    assert runner.graphs is None
    assert awake - torch.cuda.memory_reserved() >= held
    if level == 2:
        llm.wake_up(["weights"])
        llm.load_weights(_checkpoint_weights(path))
    llm.wake_up()
    assert runner.graphs is not None and runner.prefill_graphs is not None
    assert _tokens(llm) == before
