"""Which steps the prefill CUDA graphs take by default, and how far a step pads: a one-image
Pixtral-12B prompt (827 tokens) replays a graph, padded by 5 tokens (every padded row costs
a decoder row of GEMM work)."""

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.prefill_graphs import PrefillGraphs
from tests.helpers import tiny_checkpoint


def test_default_prefill_graphs_take_a_pixtral_image_prompt(tmp_path_factory):
    engine = Engine(
        str(tiny_checkpoint(tmp_path_factory, "qwen3")), dtype="float32", device="cpu",
        num_kv_blocks=128, skip_tokenizer_init=True,
    )  # fmt: skip
    runner = engine.runner
    max_tokens = EngineConfig().max_prefill_graph_tokens
    graphs = PrefillGraphs(
        runner.model, runner.kv_caches, max_tokens, 64, runner.uses_mrope, runner.num_kv_groups
    )
    assert graphs.can_run(827, 1, 52)
    assert next(b for b in graphs.buckets if b >= 827) == 832
    assert not graphs.can_run(graphs.buckets[-1] + 1, 1, 52)
    for n in range(1, graphs.buckets[-1] + 1):
        pad = next(b for b in graphs.buckets if b >= n) - n
        assert pad < (16 if n <= 512 else 32), n


def test_verify_steps_of_many_sequences_take_their_own_shapes(tmp_path_factory):
    """With n-gram drafts (k = 4), a verify step of 9-16 sequences fits a verify shape (16
    sequences x 5 tokens, its grid sized by 5 queries a sequence): greedy tokens equal decoding
    without drafts (the graphs uncaptured on the CPU: the same padded forward, run eagerly)."""
    from polymodal.llm_core.sampling_params import SamplingParams
    from tests.llm_core.test_speculative import NGRAM, PROMPTS

    path = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    prompts = PROMPTS + [p[1:] for p in PROMPTS]  # 16 sequences
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(spec):
        kw = {"speculative_config": NGRAM} if spec else {}
        engine = Engine(path, dtype="float32", device="cpu", num_kv_blocks=256, **kw)
        runner = engine.runner
        graphs = PrefillGraphs(runner.model, runner.kv_caches, 128, 64, False, verify_width=5,
                               max_seqs=16)  # fmt: skip
        assert (80, 16, 5) in graphs.shapes and (60, 12, 5) in graphs.shapes
        assert graphs.can_run(75, 15, 10, max_query_len=5)
        assert not graphs.can_run(75, 15, 10, max_query_len=6)
        assert not graphs.can_run(75, 17, 10, max_query_len=5)
        runner.prefill_graphs = graphs
        ids = [engine.add_request(p, params) for p in prompts]
        final = engine.run_until_done()
        return [final[i].outputs[0].token_ids for i in ids], engine

    drafted, engine = run(True)
    assert drafted == run(False)[0]
    assert engine.runner.prefill_graphs.verify_runs > 0
    assert engine.speculation.num_accepted_tokens > 0
    assert engine.num_free_blocks == 256
