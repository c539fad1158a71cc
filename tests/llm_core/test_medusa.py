"""Medusa heads (`speculative_config={"method": "medusa", "model": DIR}`): every proposal
equals an independent reference (plain torch over the saved tensors, from the target's last
hidden state computed by transformers on the same context); greedy outputs equal decoding
without drafts (batches, chunk budgets, preemption, the decode / prefill graph paths, sliding
windows); both published layouts load (vLLM's, FasterDecoding's `medusa_lm_head.pt`), with a
shared LM head and a truncated vocabulary; what does not fit is refused naming it."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import run_preempted, tiny_checkpoint
from tests.llm_core.eagle_reference import record_proposals
from tests.llm_core.test_eagle import GREEDY, PROMPTS, _run


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return str(tiny_checkpoint(tmp_path_factory, "llama", num_hidden_layers=2))


@pytest.fixture(scope="module")
def hf_target(target):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()


def make_heads(hf, num_heads=4, layers=1, seed=0, echo=True, bias=False):
    """Head tensors in vLLM's names: head 0 (`echo`) repeats the target's own next token (zero
    blocks, the target's LM head: drafts the model accepts where it repeats itself), the others
    random."""
    g = torch.Generator().manual_seed(seed)
    hidden, vocab = hf.config.hidden_size, hf.config.vocab_size
    t = {}
    for i in range(num_heads):
        for j in range(layers):
            scale = 0.0 if echo and i == 0 else 1.0 / hidden**0.5
            t[f"blocks.{i}.layers.{j}.weight"] = torch.randn(hidden, hidden, generator=g) * scale
            if bias:
                t[f"blocks.{i}.layers.{j}.bias"] = torch.randn(hidden, generator=g) * scale
        lm = torch.randn(vocab, hidden, generator=g) / hidden**0.5
        t[f"lm_heads.{i}.weight"] = hf.lm_head.weight.detach().clone() if echo and i == 0 else lm
    return t


def write_vllm(out, hf, tensors, **extra):
    out.mkdir(parents=True)
    heads = sum(1 for n in tensors if n.endswith(".layers.0.weight"))
    config = {"architectures": ["MedusaModel"], "model_type": "medusa",
              "hidden_size": hf.config.hidden_size, "vocab_size": hf.config.vocab_size,
              "num_heads": heads, "num_hidden_layers": 1, **extra}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    save_file({n: v.contiguous() for n, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def reference_drafts(hf, tensors, context, count, shared=False, token_map=None):
    """The first `count` heads' argmax ids from the target's last hidden state at the
    position before the newest token (transformers' forward over the context without it)."""
    with torch.no_grad():
        ids = torch.tensor([context[:-1]])
        h = hf.model(input_ids=ids).last_hidden_state[0, -1]
        out = []
        for i in range(count):
            x, j = h, 0
            while f"blocks.{i}.layers.{j}.weight" in tensors:
                bias = tensors.get(f"blocks.{i}.layers.{j}.bias")
                x = x + F.silu(F.linear(x, tensors[f"blocks.{i}.layers.{j}.weight"], bias))
                j += 1
            top = int(F.linear(x, tensors[f"lm_heads.{0 if shared else i}.weight"]).argmax())
            out.append(top if token_map is None else int(token_map[top]))
    return out


def _engine(target, heads=None, k=3, **kw):
    kw.setdefault("num_kv_blocks", 256)
    if heads is not None:
        kw["speculative_config"] = {"method": "medusa", "model": str(heads),
                                    "num_speculative_tokens": k}  # fmt: skip
    return Engine(target, dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def plain(target):
    return _run(_engine(target))


@pytest.fixture(scope="module")
def heads(tmp_path_factory, hf_target):
    tensors = make_heads(hf_target)
    return write_vllm(tmp_path_factory.mktemp("medusa") / "h", hf_target, tensors), tensors


@pytest.mark.parametrize("budget", [None, 16])
def test_drafts_equal_the_reference_and_outputs_do_not_change(target, heads, hf_target, plain,
                                                              budget):  # fmt: skip
    """Drafts follow the row of the last accepted position (the echo head's drafts are taken
    where the model repeats itself); with a 16-token step budget the prompts split over steps."""
    path, tensors = heads
    engine = _engine(target, path, 3, max_num_batched_tokens=budget)
    seen = record_proposals(engine)
    assert _run(engine) == plain
    stats = engine.speculation
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 0
    assert len(seen) > 20
    for context, drafts in seen:
        assert drafts == reference_drafts(hf_target, tensors, context, len(drafts)), context
    assert engine.num_free_blocks == 256


def test_rows_from_the_graph_paths_and_preemption(target, heads, hf_target, plain):
    """The decode and prefill graphs' rows (uncaptured on the CPU: the same padded forward,
    eagerly) feed the heads as eager rows do; a preempted request drafts again after its
    recompute."""
    from polymodal.llm_core.cuda_graph import DecodeGraphs
    from polymodal.llm_core.prefill_graphs import PrefillGraphs

    path, tensors = heads
    engine = _engine(target, path, 2)
    runner = engine.runner
    runner.graphs = DecodeGraphs(runner.model, runner.kv_caches, 8, 16, False)
    runner.prefill_graphs = PrefillGraphs(runner.model, runner.kv_caches, 64, 16, False)
    seen = record_proposals(engine)
    assert _run(engine) == plain
    assert runner.prefill_graphs.runs > 0
    for context, drafts in seen:
        assert drafts == reference_drafts(hf_target, tensors, context, len(drafts))
    small = _engine(target, path, 2, num_kv_blocks=8, max_num_seqs=4)
    assert run_preempted(small, PROMPTS[2:6], GREEDY) == plain[2:6]


def test_sliding_window_targets(tmp_path_factory):
    """No KV of its own: Medusa drafts for a target with sliding-window layers (Gemma 3), where
    draft models and EAGLE heads are refused."""
    from transformers import AutoModelForCausalLM

    target = str(tiny_checkpoint(tmp_path_factory, "gemma3"))
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    path = write_vllm(tmp_path_factory.mktemp("g") / "h", hf, make_heads(hf, 3, seed=1))
    prompts, params = PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=10)
    engine = _engine(target, path, 3)
    assert _run(engine, prompts, params) == _run(_engine(target), prompts, params)
    assert engine.speculation.num_draft_tokens > 0


@pytest.mark.parametrize("layout", ["fasterdecoding", "shared_lm_head", "token_map"])
def test_published_layouts(tmp_path_factory, target, hf_target, plain, layout):
    """FasterDecoding's `medusa_lm_head.pt` (biased blocks, `{i}.{j}.linear.*`, `{i}.1.weight`);
    vLLM's `original_lm_head` (one LM head for all); `truncated_vocab_size` + `token_map`."""
    out = tmp_path_factory.mktemp(layout) / "h"
    tensors = make_heads(hf_target, 3, seed=2, echo=False, bias=layout == "fasterdecoding")
    shared, token_map = layout == "shared_lm_head", None
    if layout == "fasterdecoding":
        out.mkdir()
        config = {"medusa_num_heads": 3, "medusa_num_layers": 1,
                  "hidden_size": hf_target.config.hidden_size,
                  "vocab_size": hf_target.config.vocab_size}  # fmt: skip
        (out / "config.json").write_text(json.dumps(config))
        state = {}
        for i in range(3):
            state[f"{i}.0.linear.weight"] = tensors[f"blocks.{i}.layers.0.weight"]
            state[f"{i}.0.linear.bias"] = tensors[f"blocks.{i}.layers.0.bias"]
            state[f"{i}.1.weight"] = tensors[f"lm_heads.{i}.weight"]
        torch.save(state, out / "medusa_lm_head.pt")
    elif shared:
        for i in (1, 2):
            del tensors[f"lm_heads.{i}.weight"]
        write_vllm(out, hf_target, tensors, original_lm_head=True)
    else:
        vocab = hf_target.config.vocab_size
        token_map = torch.randperm(vocab, generator=torch.Generator().manual_seed(4))[:200]
        saved = {**tensors, "token_map": token_map}
        for i in range(3):  # the heads over the mapped rows only
            tensors[f"lm_heads.{i}.weight"] = tensors[f"lm_heads.{i}.weight"][token_map]
            saved[f"lm_heads.{i}.weight"] = tensors[f"lm_heads.{i}.weight"]
        write_vllm(out, hf_target, saved, truncated_vocab_size=200)
    engine = _engine(target, out, 3)
    seen = record_proposals(engine)
    assert _run(engine, PROMPTS[:3]) == plain[:3]
    assert seen
    for context, drafts in seen:
        want = reference_drafts(hf_target, tensors, context, len(drafts), shared, token_map)
        assert drafts == want


def test_what_does_not_fit_is_refused(tmp_path_factory, target, hf_target, heads):
    path, tensors = heads
    with pytest.raises(InvalidInputError, match="num_speculative_tokens=5: the Medusa .* 4 heads"):
        _engine(target, path, 5)
    bad = write_vllm(tmp_path_factory.mktemp("b") / "h", hf_target, tensors, hidden_size=8)
    with pytest.raises(InvalidInputError, match="hidden size 8 .* do not fit the target"):
        _engine(target, bad, 2)
    partial = dict(tensors)
    del partial["lm_heads.2.weight"]
    gone = write_vllm(tmp_path_factory.mktemp("p") / "h", hf_target, partial)
    with pytest.raises(ModelLoadError, match="'lm_heads.2.weight' is missing"):
        _engine(target, gone, 2)
    nomap = write_vllm(tmp_path_factory.mktemp("m") / "h", hf_target, tensors,
                       truncated_vocab_size=100)  # fmt: skip
    with pytest.raises(ModelLoadError, match="needs the checkpoint's 'token_map'"):
        _engine(target, nomap, 2)


def test_dummy_weights_and_sleep(target, heads, hf_target, tmp_path):
    """`dummy_weights` (the bench's `--dummy-weights`): a folder with only config.json builds
    random heads (`sdk/configs/medusa_qwen2_5_vl_7b` fits the 7B bench target); sleep mode frees
    the heads with the target and gives their drafts back after waking."""
    from pathlib import Path

    path, tensors = heads
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    engine = _engine(target, tmp_path, 2, dummy_weights=True)
    outs = _run(engine, PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert [len(o) for o in outs] == [5, 5] and engine.speculation.num_draft_tokens > 0
    shipped = Path(__file__).resolve().parents[2] / "sdk" / "configs" / "medusa_qwen2_5_vl_7b"
    config = json.loads((shipped / "config.json").read_text())
    assert (config["hidden_size"], config["vocab_size"], config["num_heads"]) == (3584, 152064, 4)
    from polymodal import LLM

    spec = {"method": "medusa", "model": str(path), "num_speculative_tokens": 3}
    llm = LLM(target, device="cpu", dtype="float32", num_kv_blocks=128, enable_sleep_mode=True,
              speculative_config=spec)  # fmt: skip
    llm.sleep(level=1)
    llm.wake_up()
    seen = record_proposals(llm.engine)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:2]]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == _run(_engine(target), PROMPTS[:2])
    assert seen
    for context, drafts in seen:
        assert drafts == reference_drafts(hf_target, tensors, context, len(drafts))
