"""EAGLE / EAGLE-3 heads (`speculative_config={"method": "eagle" | "eagle3", "model": DIR}`):
every proposal equals an independent reference of the published heads (plain torch, whole
sequence recomputed) on the same context; greedy outputs equal decoding without drafts
(batches, chunked prefill, preemption, stops); the published layouts load (safetensors and
`pytorch_model.bin`, `midlayer.`, `d2t`); what is not done is refused naming it."""

import pytest
import torch

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import run_preempted, tiny_checkpoint
from tests.llm_core.eagle_reference import record_proposals, reference_drafts, write_head

PROMPTS = [[(11 * i + 5 * j) % 450 + 20 for j in range(n)] for i, n in enumerate(range(4, 50, 9))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A 4-layer tiny Llama (EAGLE-3 reads three of its layers)."""
    return str(tiny_checkpoint(tmp_path_factory, "llama", num_hidden_layers=4))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {v: write_head(root / v, v, seed=3) for v in ("eagle", "eagle3")}


def _engine(target, head=None, variant="eagle", k=3, **kw):
    kw.setdefault("num_kv_blocks", 256)
    if head is not None:
        kw["speculative_config"] = {"method": variant, "model": str(head),
                                    "num_speculative_tokens": k}  # fmt: skip
    return Engine(target, dtype="float32", device="cpu", **kw)


def _run(engine, prompts=PROMPTS, params=GREEDY):
    ids = [engine.add_request(p, params) for p in prompts]
    final = engine.run_until_done()
    return [final[i].outputs[0].token_ids for i in ids]


@pytest.fixture(scope="module")
def plain(target):
    return _run(_engine(target))


@pytest.fixture(scope="module")
def hf_target(target):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
@pytest.mark.parametrize("budget", [None, 16])
def test_drafts_equal_the_reference_and_outputs_do_not_change(target, heads, hf_target, plain,
                                                              variant, budget):  # fmt: skip
    """The head's one-token steps run through its graphs' padded buffers (uncaptured on the
    CPU); with a step budget of 16 tokens (the prompts and the head's catch-up split over
    steps) they run plainly (`max_graph_batch=0`)."""
    graphs = 0 if budget else 512
    engine = _engine(target, heads[variant], variant, 3, max_num_batched_tokens=budget,
                     max_graph_batch=graphs)  # fmt: skip
    assert (engine.speculation.drafter.graphs is None) == (graphs == 0)
    seen = record_proposals(engine)
    assert _run(engine) == plain
    assert len(seen) > 20
    for context, drafts in seen:
        want = reference_drafts(hf_target, heads[variant], variant, context, len(drafts))
        assert drafts == want, context
    assert engine.num_free_blocks == 256


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
def test_features_from_the_graph_paths(target, heads, hf_target, plain, variant):
    """The target's decode and prefill graphs (uncaptured on the CPU: the same padded forward
    run eagerly) keep the hidden states and residual streams the head reads: every other step
    drafts nothing (a decode-graph step), and the next proposal reads its features."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs
    from polymodal.llm_core.prefill_graphs import PrefillGraphs

    engine = _engine(target, heads[variant], variant, 2)
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, 16, False)
    runner.prefill_graphs = PrefillGraphs(runner.model, runner.kv_caches, 64, 16, False)
    seen = record_proposals(engine)
    drafter, calls = engine.speculation.drafter, []
    propose = drafter.propose

    def every_other(kv, reqs, rooms, vocab):  # a step without drafts replays a decode graph
        calls.append(len(calls) % 2)
        return propose(kv, reqs, rooms, vocab) if calls[-1] else [[] for _ in reqs]

    drafter.propose = every_other
    assert _run(engine, PROMPTS[:4]) == plain[:4]
    assert runner.graphs.runs > 0 and runner.prefill_graphs.runs > 0 and len(seen) > 8
    for context, drafts in seen:
        assert drafts == reference_drafts(hf_target, heads[variant], variant, context, len(drafts))


def test_prefix_hits_read_the_heads_keys_in_the_cached_blocks(target, heads, hf_target, plain):
    """The prompts again: their blocks come from the prefix cache, with the keys the first
    run's head wrote in them (the target never recomputes those positions, so the head has no
    features for them); the drafts still equal the reference."""
    engine = _engine(target, heads["eagle3"], "eagle3", 3)
    assert _run(engine) == plain
    seen = record_proposals(engine)
    assert _run(engine) == plain
    assert engine.scheduler.kv.num_hit_tokens > 0 and seen
    for context, drafts in seen:
        want = reference_drafts(hf_target, heads["eagle3"], "eagle3", context, len(drafts))
        assert drafts == want, context


def test_steps_that_do_not_draft_keep_their_features(target, heads, hf_target, plain,
                                                     monkeypatch):  # fmt: skip
    """`disable_by_batch_size`: while more sequences run than it allows, steps draft nothing
    (and overlap, with async scheduling) but record their features; once fewer run, the head
    catches up on them and drafts as the reference does. With the rows capped below what a
    sequence gathered, the oldest positions are skipped: the outputs stay the same."""
    config = {"method": "eagle3", "model": str(heads["eagle3"]), "num_speculative_tokens": 3,
              "disable_by_batch_size": 2}  # fmt: skip
    engine = _engine(target, num_kv_blocks=256, async_scheduling=True, speculative_config=config)
    seen = record_proposals(engine)
    budgets = [SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True)
               for i in range(len(PROMPTS))]  # fmt: skip
    ids = [engine.add_request(p, q) for p, q in zip(PROMPTS, budgets)]
    final = engine.run_until_done()
    assert [final[i].outputs[0].token_ids for i in ids] == [
        w[: 4 + 2 * i] for i, w in enumerate(plain)
    ]
    assert seen and engine.num_free_blocks == 256
    for context, drafts in seen:
        want = reference_drafts(hf_target, heads["eagle3"], "eagle3", context, len(drafts))
        assert drafts == want, context
    monkeypatch.setattr("polymodal.llm_core.eagle.MAX_FEATURE_ROWS", 8)
    engine = _engine(target, num_kv_blocks=256, speculative_config=config)
    ids = [engine.add_request(p, q) for p, q in zip(PROMPTS, budgets)]
    final = engine.run_until_done()
    assert [final[i].outputs[0].token_ids for i in ids] == [
        w[: 4 + 2 * i] for i, w in enumerate(plain)
    ]
    assert engine.speculation.num_draft_tokens > 0


def test_preemption_stops_and_sampled_rows(target, heads, plain):
    small = _engine(target, heads["eagle3"], "eagle3", 2, num_kv_blocks=8, max_num_seqs=4)
    assert run_preempted(small, PROMPTS[2:6], GREEDY) == plain[2:6]
    assert small.num_free_blocks == 8
    engine = _engine(target, heads["eagle"], "eagle", 4)
    stop = plain[3][6]
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True,
                            stop_token_ids=[stop])  # fmt: skip
    assert _run(engine, [PROMPTS[3]], params) == [plain[3][: plain[3].index(stop) + 1]]
    seeded = SamplingParams(temperature=0.7, seed=5, max_tokens=10, ignore_eos=True)
    assert len(_run(engine, [PROMPTS[1]], seeded)[0]) == 10
    assert engine.speculation.num_draft_tokens > 0


def test_a_binary_checkpoint_loads(target, heads, hf_target, tmp_path):
    """`pytorch_model.bin` (how the published EAGLE heads ship) reads as safetensors do."""
    head = write_head(tmp_path / "bin", "eagle3", seed=3, binary=True)
    engine = _engine(target, head, "eagle3", 2)
    seen = record_proposals(engine)
    _run(engine, PROMPTS[:2])
    context, drafts = seen[0]
    assert drafts == reference_drafts(hf_target, head, "eagle3", context, len(drafts))


def test_what_is_not_done_is_refused(target, heads, tmp_path, tmp_path_factory):
    other = str(tiny_checkpoint(tmp_path_factory, "qwen2"))  # hidden 64 too, 2 layers
    with pytest.raises(InvalidInputError, match=r"no decoder layers \[1, 2, 3\]"):
        _engine(other, heads["eagle3"], "eagle3")
    bad = write_head(tmp_path / "bad", "eagle")
    (bad / "config.json").write_text((bad / "config.json").read_text().replace(
        '"hidden_size": 64', '"hidden_size": 32'))  # fmt: skip
    with pytest.raises((InvalidInputError, ModelLoadError), match="hidden size 32"):
        _engine(target, bad, "eagle")
    gemma = str(tiny_checkpoint(tmp_path_factory, "gemma3"))
    with pytest.raises(InvalidInputError, match="drafters need one full-attention"):
        _engine(gemma, heads["eagle"], "eagle")


def test_dummy_weights_need_only_the_head_config(target, heads, tmp_path):
    """`dummy_weights` (the bench's `--dummy-weights`): a head folder with only config.json
    builds with random weights, as the target does (`sdk/configs/eagle3_qwen2_5_vl_7b`)."""
    (tmp_path / "config.json").write_text((heads["eagle3"] / "config.json").read_text())
    engine = _engine(target, tmp_path, "eagle3", 2, dummy_weights=True)
    head = engine.speculation.drafter.net
    assert head.lm_head.out_features == 200 and head.d2t is not None
    outs = _run(engine, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert [len(o) for o in outs] == [5, 5] and engine.speculation.num_draft_tokens > 0
    from pathlib import Path

    from polymodal.llm_core.config import load_config

    shipped = Path(__file__).resolve().parents[2] / "sdk" / "configs" / "eagle3_qwen2_5_vl_7b"
    parsed = load_config(shipped, "auto", "generate", {"architectures": ["LlamaForCausalLM"]})
    assert (parsed.hidden_size, parsed.num_layers, parsed.dtype) == (3584, 1, torch.bfloat16)
    assert parsed.text_config.draft_vocab_size == 32000


def test_grammars_sleep_and_the_server(target, heads, hf_target, tmp_path_factory):
    """A grammar's rows draft only what it allows; sleep mode frees and restores the head
    (its drafts are the reference's after waking); `--speculative-config` with an EAGLE-3 head
    through a real server gives `LLM.generate`'s tokens."""
    import json

    from polymodal import LLM
    from polymodal.llm_core.sampling_params import StructuredOutputsParams
    from tests.sdk.server_process import post, running_server

    spec = {"method": "eagle3", "model": str(heads["eagle3"]), "num_speculative_tokens": 3}
    llm = LLM(target, device="cpu", dtype="float32", num_kv_blocks=128, enable_sleep_mode=True,
              speculative_config=spec)  # fmt: skip
    choice = SamplingParams(
        temperature=0.0,
        max_tokens=8,
        structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]),
    )
    plain_llm = LLM(target, device="cpu", dtype="float32", num_kv_blocks=128)
    want = plain_llm.generate("pick one", choice, use_tqdm=False)[0].outputs[0].text
    assert llm.generate("pick one", choice, use_tqdm=False)[0].outputs[0].text == want
    before = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS[:3]], GREEDY, use_tqdm=False)]  # fmt: skip
    llm.sleep(level=1)
    llm.wake_up()
    seen = record_proposals(llm.engine)
    after = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS[:3]], GREEDY, use_tqdm=False)]  # fmt: skip
    assert after == before and seen
    for context, drafts in seen:
        assert drafts == reference_drafts(hf_target, heads["eagle3"], "eagle3", context,
                                          len(drafts))  # fmt: skip
    log_dir = tmp_path_factory.mktemp("log")
    with running_server(target, log_dir, "--speculative-config", json.dumps(spec),
                        "--dtype", "float32", "--num-kv-blocks", "64") as url:  # fmt: skip
        body = {"model": "m", "prompt": PROMPTS[1], "max_tokens": 14, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        reply = post(url, "/v1/completions", body).json()
        assert reply["choices"][0]["token_ids"] == before[1]
