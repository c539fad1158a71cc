"""The LoRA manager an engine builds (`engine_config.build_rank`): for `enable_lora`, and for
a model with adapters of its own (Phi-4-multimodal's vision / speech LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.lora.adapter import LoRARequest, adapter_from_tensors, load_adapter
from polymodal.llm_core.lora.manager import LoRAManager


def engine_lora_manager(net, cfg, device: torch.device, pooling: bool, dtype):
    """The LoRAManager of an engine with `enable_lora` (its layers wrapped), or of a model
    with adapters of its own (`builtin_adapters`: Phi-4-MM's vision / speech LoRA, routed per
    request by `modality_adapter`; room for them is added to `max_loras` / `max_lora_rank`),
    else None."""
    builtin = net.builtin_adapters() if hasattr(net, "builtin_adapters") else {}
    if not (cfg.enable_lora or builtin):
        return None
    if pooling:
        raise InvalidInputError("enable_lora: LoRA adapters on pooling models are not supported")
    ranks = [int(_peft_config(c).get("r", 8)) for c, _ in builtin.values()]
    max_loras = max(cfg.max_loras, len(builtin)) if cfg.enable_lora else len(builtin)
    # rows a forward can have: a step's tokens, or a decode graph's (padded) sequences
    rows = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
    manager = LoRAManager(
        net, max_loras, max([cfg.max_lora_rank, *ranks]), rows, device, cfg.max_cpu_loras, dtype
    )
    net.adapter_requests = {}
    for index, (name, (config, tensors)) in enumerate(builtin.items()):
        # ids far above a user's; the path names where the adapter came from
        path = str(config) if tensors is None else f"{type(net).__name__}#{name}_lora"
        request = LoRARequest(name, 1_000_000_000 + index, path)
        args = (manager.layers, manager.packed, manager.remap, manager.max_rank)
        if tensors is None:
            adapter = load_adapter(request, *args)
        else:
            adapter = adapter_from_tensors(request, config, tensors, *args)
        manager.register(request, adapter)
        net.adapter_requests[name] = request
    return manager


def _peft_config(config) -> dict:
    """A builtin adapter's config dict (given, or its PEFT folder's adapter_config.json)."""
    if isinstance(config, dict):
        return config
    return json.loads((Path(config) / "adapter_config.json").read_text())
