"""Multi-LoRA on CUDA: the Triton kernels inside captured decode and prefill graphs. Mixed
adapters in one batch (fp32) give what each request gives alone on PEFT's merged checkpoint;
in bf16 a mixed batch gives each request's tokens of a batch of its own adapter only."""

from __future__ import annotations

import pytest
import torch

from polymodal import LoRARequest
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits_by_request, tiny_checkpoint

pytestmark = pytest.mark.gpu
pytest.importorskip("peft")

PROMPTS = [[5, 9, 33, 70, 11], [7, 7, 8], list(range(100, 140)), [12, 13], [40] * 20]
NAMES = ["all", None, "qv_down", "rslora_mlp", "all"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.llm_core.lora_adapters import make_adapters

    base = tiny_checkpoint(tmp_path_factory, "llama")
    return base, make_adapters(base, tmp_path_factory.mktemp("lora_gpu"))


def _loras(adapters, names):
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    return [None if n is None else LoRARequest(n, ids[n], str(adapters[n][0])) for n in names]


def _run(engine, prompts, loras):
    seen = record_logits_by_request(engine)
    ids = [engine.add_request(p, PARAMS, lora_request=lo) for p, lo in zip(prompts, loras)]
    final = engine.run_until_done()
    return [(final[i].outputs[0].token_ids, seen[i]) for i in ids]


def test_mixed_batch_in_graphs_equals_merged_fp32(setup):
    base, adapters = setup
    opts = {"device": "cuda", "dtype": "float32", "num_kv_blocks": 64, "max_num_seqs": 8}
    engine = Engine(str(base), enable_lora=True, max_loras=2, **opts)
    assert engine.runner.graphs is not None and engine.runner.lora.batch.use_triton
    batched = _run(engine, PROMPTS, _loras(adapters, NAMES))
    assert engine.runner.graphs.runs > 0  # decode steps replayed graphs with the kernels in
    for prompt, name, (tokens, logits) in zip(PROMPTS, NAMES, batched):
        merged = base if name is None else adapters[name][1]
        ref_tokens, ref_logits = _run(Engine(str(merged), **opts), [prompt], [None])[0]
        assert tokens == ref_tokens, name
        for row, ref in zip(logits, ref_logits):
            assert (row - ref).abs().max().item() <= 1e-3, name
    torch.cuda.synchronize()


def test_mixed_batch_bf16_equals_single_adapter_batches(setup):
    base, adapters = setup
    opts = {"device": "cuda", "dtype": "bfloat16", "num_kv_blocks": 64, "max_num_seqs": 8}
    engine = Engine(str(base), enable_lora=True, max_loras=3, **opts)
    mixed = _run(engine, PROMPTS, _loras(adapters, NAMES))
    for prompt, name, (tokens, _) in zip(PROMPTS, NAMES, mixed):
        alone = _run(engine, [prompt], _loras(adapters, [name]))[0]
        assert tokens == alone[0], name
