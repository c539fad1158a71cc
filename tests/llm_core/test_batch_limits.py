"""Default step sizes by device: the bench's sizes on a large GPU, half the token budget for an
online server there (as vLLM's API server), the user's values kept."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from polymodal.llm_core.engine_config import EngineConfig, resolve_batch_limits


def _limits(cfg: EngineConfig, device: torch.device) -> tuple[int, int]:
    out = resolve_batch_limits(cfg, device)
    return out.max_num_seqs, out.max_num_batched_tokens


def test_serving_halves_the_token_budget_on_gpus(monkeypatch):
    gib = {"size": 141}
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: SimpleNamespace(total_memory=gib["size"] << 30),
    )
    gpu = torch.device("cuda", 0)
    assert _limits(EngineConfig(), gpu) == (512, 16384)
    assert _limits(EngineConfig(serving=True), gpu) == (512, 8192)
    assert _limits(EngineConfig(serving=True, max_num_batched_tokens=16384), gpu) == (512, 16384)
    gib["size"] = 40
    assert _limits(EngineConfig(serving=True), gpu) == (256, 4096)
    # the CPU keeps its one size either way
    cpu = torch.device("cpu")
    assert _limits(EngineConfig(serving=True), cpu) == _limits(EngineConfig(), cpu) == (256, 4096)
