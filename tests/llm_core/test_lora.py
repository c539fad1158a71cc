"""Batched multi-LoRA (torch path, fp32, CPU): requests with different adapters (and none) in
the same steps give what each gives alone on a checkpoint with its adapter merged into the
weights (PEFT's `merge_and_unload`): greedy tokens identical, fp32 logits within 1e-4.
Adapters are made with `peft` (tests/llm_core/lora_adapters.py). Bad adapters and bad requests
get errors naming them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

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
    # dense layers: the shrink rides in the base GEMM (`fold_storage`; torch path here)
    assert all(layer.method.folded for layer in engine.runner.lora.layers.values())
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


def test_a_request_without_a_free_slot_waits_while_others_run(llama_adapters):
    base, adapters = llama_adapters
    engine = Engine(str(base), enable_lora=True, max_loras=1, **ENGINE)
    first, second = _lora(adapters, "all", 1), _lora(adapters, "qv_down", 2)
    ids = [engine.add_request(p, PARAMS, lora_request=lo)
           for p, lo in zip(PROMPTS[:3], [first, second, None])]  # fmt: skip
    engine.step()
    # the one slot holds `first`: `second` waits (at the front), the base request goes ahead
    running = [r.request_id for r in engine.scheduler.running]
    assert running == [f"{ids[0]}#0", f"{ids[2]}#0"]
    assert [r.request_id for r in engine.scheduler.waiting] == [f"{ids[1]}#0"]
    manager = engine.runner.lora
    assert manager.slot_users == [1] and manager.slot_key[0] == first.cache_key
    final = engine.run_until_done()  # `second` runs once `first` finished
    assert all(len(final[i].outputs[0].token_ids) == STEPS for i in ids)
    assert manager.slot_users == [0] and manager.slot_key[0] == second.cache_key


def test_steps_without_adapters_replay_the_plain_graphs(llama_adapters):
    """Decode steps replay the LoRA graph set only while a token of theirs uses an adapter
    (graphs run their padded forward eagerly here, on CPU), and give what an engine without
    graphs gives; a LoRA engine's steps without adapters equal the plain engine's exactly."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs

    base, adapters = llama_adapters

    def engine_with_graphs(**kwargs):
        engine = Engine(str(base), **ENGINE, **kwargs)
        runner = engine.runner
        runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, 16, runner.uses_mrope)
        return engine

    plain = _run(engine_with_graphs(), PROMPTS[:2], [None, None])
    engine = engine_with_graphs(enable_lora=True, max_loras=1)
    runner = engine.runner
    again = _run(engine, PROMPTS[:2], [None, None])
    for (tokens, logits), (ref_tokens, ref_logits) in zip(again, plain):
        assert tokens == ref_tokens  # and the logits bitwise: the same kernels ran
        assert len(logits) == len(ref_logits) and all(map(torch.equal, logits, ref_logits))
    assert runner.graphs.runs > 0 and runner.graphs.lora_runs == 0
    # the adapter request stops after 3 tokens, the other decodes on without it
    chosen, expected = [], []
    run_graph, launch = runner.graphs.run, runner.launch

    def traced_run(hb, prev_tokens=None, lora=False):
        chosen.append(lora)
        return run_graph(hb, prev_tokens, lora)

    def traced_launch(sched, *args, **kwargs):
        if sched.requests and all(n == 1 for n in sched.num_new_tokens):  # a decode step
            expected.append(any(r.lora_slot >= 0 for r in sched.requests))
        return launch(sched, *args, **kwargs)

    runner.graphs.run, runner.launch = traced_run, traced_launch
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    lora = _lora(adapters, "all", 1)
    seen = record_logits_by_request(engine)
    ids = [engine.add_request(PROMPTS[0], short, lora_request=lora),
           engine.add_request(PROMPTS[1], PARAMS)]  # fmt: skip
    final = engine.run_until_done()
    assert chosen == expected and True in chosen and False in chosen
    eager = Engine(str(base), enable_lora=True, max_loras=1, **ENGINE)
    eager_seen = record_logits_by_request(eager)
    eager_ids = [eager.add_request(PROMPTS[0], short, lora_request=lora),
                 eager.add_request(PROMPTS[1], PARAMS)]  # fmt: skip
    eager_final = eager.run_until_done()
    for i, j in zip(ids, eager_ids):
        got = final[i].outputs[0].token_ids, seen[i]
        _assert_same(got, (eager_final[j].outputs[0].token_ids, eager_seen[j]), "graphs")


def test_lora_engines_capture_both_graph_sets():
    """`_capture`: with LoRA, the LoRA set records the kernels (always_run) over cleared device
    buffers, then the plain set without them; always_run is off after; without LoRA one set."""
    from polymodal.llm_core.lora.layer import LoRABatch
    from polymodal.llm_core.runner import ModelRunner

    class Graphs:
        def __init__(self, batch):
            self.batch, self.captured = batch, []

        def capture(self, lora):
            seg = None if self.batch is None else self.batch.segments
            state = None if seg is None else (self.batch.always_run, int(seg.seg_len.sum()),
                                              int(seg.token_slot.max()))  # fmt: skip
            self.captured.append((lora, state))

    runner = ModelRunner.__new__(ModelRunner)
    runner.lora = None
    graphs = Graphs(None)
    runner._capture(graphs)
    assert graphs.captured == [(False, None)]

    class Manager:
        batch = LoRABatch(2, 16, "cpu")

    runner.lora = Manager()
    Manager.batch.use_triton = True
    Manager.batch.set_step([(1, 3), (0, 2)])  # left over from a step before the capture
    graphs = Graphs(Manager.batch)
    runner._capture(graphs)
    assert graphs.captured == [(True, (True, 0, -1)), (False, (False, 0, -1))]
    assert not Manager.batch.always_run and not runner.lora_step()
