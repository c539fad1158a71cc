"""Speculative decoding on CUDA: the Triton backend with decode and prefill graphs (a step of
one sequence with drafts replays a prefill graph; more than eight a verify shape's), in fp32, gives
the tokens of decoding without drafts (in bf16 a chunk's and a decode step's rounding may
differ, so near ties can flip: the bench measures bf16). N-gram drafts, a draft model whose
one-token steps replay its own captured decode graphs, and EAGLE / EAGLE-3 heads fed by the
target's decode and prefill graphs."""

import pytest
import torch

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint
from tests.llm_core.test_speculative import NGRAM, PROMPTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def _outputs(path, prompts, dtype, spec):
    spec = NGRAM if spec is True else spec
    engine = Engine(path, dtype=dtype, device="cuda", num_kv_blocks=512,
                    **({"speculative_config": spec} if spec else {}))  # fmt: skip
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    final = engine.run_until_done()
    assert engine.num_free_blocks == 512 - (engine.scheduler.kv.null_block is not None)
    return engine, [final[i].outputs[0].token_ids for i in ids]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("batch", [1, 12])
def test_greedy_equals_decoding_without_drafts(tmp_path_factory, arch, batch):
    path = str(tiny_checkpoint(tmp_path_factory, arch))
    prompts = (PROMPTS * 2)[:batch]
    engine, spec = _outputs(path, prompts, "float32", True)
    _, plain = _outputs(path, prompts, "float32", False)
    assert engine.runner.graphs is not None and engine.runner.prefill_graphs is not None
    assert spec == plain
    assert engine.speculation.num_accepted_tokens > 0
    assert (engine.runner.prefill_graphs.verify_runs > 0) == (batch > 8)


@pytest.mark.parametrize("batch", [1, 12])
def test_a_draft_model_with_captured_graphs(tmp_path_factory, batch):
    """The target as its own draft: the draft's graphs are captured and replayed, its drafts
    are the target's greedy tokens, and the outputs equal decoding without drafts."""
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    prompts = (PROMPTS * 2)[:batch]
    config = {"method": "draft_model", "model": path, "num_speculative_tokens": 4}
    engine, spec = _outputs(path, prompts, "float32", config)
    _, plain = _outputs(path, prompts, "float32", False)
    draft = engine.runner.draft
    assert draft.graphs.graphs and draft.graphs.runs > 0
    assert spec == plain
    stats = engine.speculation
    assert stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens > 0


@pytest.mark.parametrize("variant", ["eagle", "eagle3"])
@pytest.mark.parametrize("batch", [1, 12])
def test_eagle_heads_under_the_target_graphs(tmp_path_factory, variant, batch):
    """The head's features come from the target's captured graphs (their kept outputs): the
    outputs equal decoding without drafts and the drafts match the CPU reference (fp32; a
    near tie may flip one)."""
    from transformers import AutoModelForCausalLM

    from tests.llm_core.eagle_reference import record_proposals, reference_drafts, write_head

    path = str(tiny_checkpoint(tmp_path_factory, "llama", num_hidden_layers=4))
    head = write_head(tmp_path_factory.mktemp("head") / variant, variant, seed=3)
    config = {"method": variant, "model": str(head), "num_speculative_tokens": 3}
    prompts = (PROMPTS * 2)[:batch]
    engine = Engine(path, dtype="float32", device="cuda", num_kv_blocks=512,
                    speculative_config=config)  # fmt: skip
    seen = record_proposals(engine)
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    final = engine.run_until_done()
    _, plain = _outputs(path, prompts, "float32", False)
    assert [final[i].outputs[0].token_ids for i in ids] == plain
    assert engine.runner.graphs.runs > 0 or engine.runner.prefill_graphs.runs > 0
    head_graphs = engine.speculation.drafter.graphs
    assert head_graphs.graphs and head_graphs.runs > 0  # the head's steps replayed
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    same = sum(d == reference_drafts(hf, head, variant, c, len(d)) for c, d in seen)
    assert seen and same >= 0.9 * len(seen)


@pytest.mark.parametrize("batch", [1, 12])
def test_medusa_heads_under_the_target_graphs(tmp_path_factory, batch):
    """Medusa heads (an echo head first: the model's repeats are accepted) read the rows of
    the target's captured prefill graphs (every step after the prompt drafts: a verify step,
    in a verify shape at 12 sequences): the outputs equal decoding without drafts."""
    from transformers import AutoModelForCausalLM

    from tests.llm_core.test_medusa import make_heads, write_vllm

    path = str(tiny_checkpoint(tmp_path_factory, "llama", num_hidden_layers=2))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    heads = write_vllm(tmp_path_factory.mktemp("medusa") / "h", hf, make_heads(hf))
    config = {"method": "medusa", "model": str(heads), "num_speculative_tokens": 3}
    prompts = (PROMPTS * 2)[:batch]
    engine, spec = _outputs(path, prompts, "float32", config)
    _, plain = _outputs(path, prompts, "float32", False)
    assert spec == plain
    assert engine.runner.prefill_graphs.runs > 0
    assert (engine.runner.prefill_graphs.verify_runs > 0) == (batch > 8)
    assert engine.speculation.num_accepted_tokens > 0
