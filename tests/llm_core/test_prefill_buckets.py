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
