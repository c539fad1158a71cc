"""`dummy_weights=True` (benchmarks of full-size architectures) writes every parameter: towers
are built uninitialized (`make_uninitialized`), so a norm left alone held whatever memory it
got (a Qwen2.5-VL-7B tower's NaN made the AWQ bench's logits NaN, then its argmax an id past
the vocabulary)."""

from __future__ import annotations

import pytest
import torch

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from tests.helpers import tiny_checkpoint


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "gemma3_vl", "llava_next", "nemotron"])
def test_every_parameter_written(tmp_path_factory, arch):
    path = tiny_checkpoint(tmp_path_factory, arch)
    config = EngineConfig(dummy_weights=True, device="cpu", skip_tokenizer_init=True)
    model = Engine(str(path), config).runner.model
    norms = set()
    for name, module in model.named_modules():
        if "Norm" not in type(module).__name__:
            continue
        norms.update(id(p) for p in module.parameters(recurse=False))
        offset = type(module).__name__ in ("GemmaRMSNorm", "LayerNorm1P")  # scale = 1 + weight
        assert torch.all(module.weight == (0.0 if offset else 1.0)), name
        if getattr(module, "bias", None) is not None:
            assert torch.all(module.bias == 0.0), name
    assert norms
    for name, param in model.named_parameters():
        if id(param) not in norms:  # random weights near 0.02, zero vectors
            assert torch.isfinite(param).all() and param.abs().max() < 1.0, name
