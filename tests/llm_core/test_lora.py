"""Batched multi-LoRA (torch path, fp32, CPU): requests with different adapters (and none) in
the same steps give what each gives alone on a checkpoint with its adapter merged into the
weights (PEFT's `merge_and_unload`): greedy tokens identical, fp32 logits within 1e-4.
Adapters are made with `peft` (tests/llm_core/lora_adapters.py). Bad adapters and bad requests
get errors naming them."""

from __future__ import annotations

import json
import shutil

import pytest

from polymodal import InvalidInputError, LoRARequest
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits_by_request, tiny_checkpoint
from tests.llm_core.lora_adapters import make_adapters

pytest.importorskip("peft")

TOL = 1e-4  # fp32 logits, max abs diff
STEPS = 6
PARAMS = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
PROMPTS = [[5, 9, 33, 70, 11], [7, 7, 8], list(range(100, 140)), [5, 9, 33, 70, 11], [12, 13]]
ENGINE = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 64}


@pytest.fixture(scope="module", params=["llama", "qwen2", "phi3"])  # plain; q/k/v bias; fused
def family(request, tmp_path_factory):
    base = tiny_checkpoint(tmp_path_factory, request.param)
    adapters = make_adapters(base, tmp_path_factory.mktemp(f"lora_{request.param}"))
    return base, adapters


def _lora(adapters, name, int_id):
    return LoRARequest(name, int_id, str(adapters[name][0]))


def _run(engine, prompts, loras):
    seen = record_logits_by_request(engine)
    ids = [engine.add_request(p, PARAMS, lora_request=lora) for p, lora in zip(prompts, loras)]
    final = engine.run_until_done()
    return [(final[i].outputs[0].token_ids, seen[i]) for i in ids]


def _assert_same(got, want, what):
    tokens, logits = got
    ref_tokens, ref_logits = want
    assert tokens == ref_tokens, f"{what}: greedy tokens differ"
    for step, (row, ref) in enumerate(zip(logits, ref_logits)):
        diff = (row - ref).abs().max().item()
        assert diff <= TOL, f"{what} step {step}: max abs logit diff {diff:.2e}"


def test_mixed_adapters_in_one_batch_equal_merged_weights(family):
    base, adapters = family
    names = ["all", "qv_down", None, "rslora_mlp", "all"]
    loras = [None if n is None else _lora(adapters, n, 1 + list(adapters).index(n)) for n in names]
    # two slots for three adapters: slots are reused as requests finish
    engine = Engine(str(base), enable_lora=True, max_loras=2, max_lora_rank=16, **ENGINE)
    batched = _run(engine, PROMPTS, loras)
    references = {None: Engine(str(base), **ENGINE)}
    for name, (_, merged) in adapters.items():
        references[name] = Engine(str(merged), **ENGINE)
    for prompt, name, got in zip(PROMPTS, names, batched):
        alone = _run(references[name], [prompt], [None])[0]
        _assert_same(got, alone, f"adapter {name}")
    plain = _run(references[None], [PROMPTS[0]], [None])[0]
    assert batched[0][0] != plain[0], "the adapter should change the output"
    assert engine.num_free_blocks == 64 - 0 and sum(engine.runner.lora.slot_users) == 0


def test_prefix_cache_keeps_adapters_apart(family):
    base, adapters = family
    prompt = list(range(200, 248))  # three full 16-token blocks
    engine = Engine(str(base), enable_lora=True, max_loras=1, **ENGINE)
    lora = _lora(adapters, "all", 1)
    first = _run(engine, [prompt], [lora])[0]
    cached = len(engine.scheduler.kv.cached)
    base_run = _run(engine, [prompt], [None])[0]  # same tokens, no adapter: no cache hit
    assert len(engine.scheduler.kv.cached) == 2 * cached
    again = _run(engine, [prompt], [lora])[0]  # the adapter's own blocks are hit
    assert len(engine.scheduler.kv.cached) == 2 * cached
    _assert_same(again, first, "cache hit with the same adapter")
    _assert_same(base_run, _run(Engine(str(base), **ENGINE), [prompt], [None])[0], "base")


def test_llm_generate_takes_vllm_keywords(family):
    from polymodal import LLM

    base, adapters = family
    llm = LLM(str(base), enable_lora=True, max_loras=2, max_lora_rank=8, device="cpu",
              dtype="float32", num_kv_blocks=64)  # fmt: skip
    lora = _lora(adapters, "qv_down", 7)
    outs = llm.generate(PROMPTS[:2], PARAMS, use_tqdm=False, lora_request=lora)
    merged = LLM(str(adapters["qv_down"][1]), device="cpu", dtype="float32", num_kv_blocks=64)
    refs = merged.generate(PROMPTS[:2], PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in refs]
    streamed = list(llm.stream(PROMPTS[0], PARAMS, lora_request=lora))[-1]
    assert streamed.outputs[0].token_ids == refs[0].outputs[0].token_ids
    with pytest.raises(InvalidInputError, match="1 lora requests given for 2 prompts"):
        llm.generate(PROMPTS[:2], PARAMS, lora_request=[lora])


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    base = tiny_checkpoint(tmp_path_factory, "llama")
    return base, make_adapters(base, tmp_path_factory.mktemp("lora_bad"))


def _edited(adapters, tmp_path, name, **config):
    out = tmp_path / f"{name}_{'_'.join(config)}"
    shutil.copytree(adapters[name][0], out)
    data = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**data, **config}))
    return out


def test_bad_adapters_are_refused_naming_them(llama_adapters, tmp_path):
    base, adapters = llama_adapters
    engine = Engine(str(base), enable_lora=True, max_loras=1, max_lora_rank=8, **ENGINE)

    def add(lora):
        return engine.add_request([1, 2, 3], PARAMS, lora_request=lora)

    with pytest.raises(InvalidInputError, match=r"'ghost' .*cannot read the adapter directory"):
        add(LoRARequest("ghost", 1, str(tmp_path / "nowhere")))
    with pytest.raises(InvalidInputError, match=r"'big'.*rank 16 .*exceeds max_lora_rank=8"):
        add(LoRARequest("big", 2, str(adapters["rslora_mlp"][0])))
    lacking = _edited(adapters, tmp_path, "qv_down", target_modules=["q_proj", "w_gate"])
    with pytest.raises(InvalidInputError, match=r"modules \['w_gate'\] are not LoRA-capable"):
        add(LoRARequest("lacking", 3, str(lacking)))
    dora = _edited(adapters, tmp_path, "all", use_dora=True)
    with pytest.raises(InvalidInputError, match="use_dora=true is not supported"):
        add(LoRARequest("dora", 4, str(dora)))
    saved = _edited(adapters, tmp_path, "all", modules_to_save=["lm_head"])
    with pytest.raises(InvalidInputError, match="modules_to_save"):
        add(LoRARequest("saved", 5, str(saved)))
    good = LoRARequest("good", 6, str(adapters["qv_down"][0]))
    add(good)
    with pytest.raises(InvalidInputError, match="lora_int_id 6 already names adapter"):
        add(LoRARequest("other", 6, str(adapters["all"][0])))
    with pytest.raises(InvalidInputError, match="lora_int_id must be >= 1"):
        LoRARequest("zero", 0, "x")
    with pytest.raises(InvalidInputError, match="must be a polymodal.LoRARequest"):
        add("qv_down")
    assert len(engine.run_until_done()) == 1  # the good request still runs

    plain = Engine(str(base), **ENGINE)
    with pytest.raises(InvalidInputError, match="built without LoRA; pass enable_lora=True"):
        plain.add_request([1, 2, 3], PARAMS, lora_request=good)
    with pytest.raises(InvalidInputError, match="max_loras must be >= 1"):
        Engine(str(base), enable_lora=True, max_loras=0, **ENGINE)
