"""Qwen2-VL / Qwen2.5-VL: the Llama-family decoder with M-RoPE, plus the vision tower.

The decoder is `LlamaForCausalLM` (Qwen2 flavour: q/k/v bias, 3-section M-RoPE from the
config); the tower comes from the encoder registry and is loaded from the same checkpoint
(`visual.*`, or `model.visual.*` in transformers-v5 layout).
"""

from __future__ import annotations

from functools import partial

import torch

from polymodal.encoders.registry import get_encoder_class
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.models.llama import LlamaForCausalLM


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    """Decoder + vision tower; `encode(items)` turns media items into slot embeddings."""

    weight_name_remap = [("model.language_model.", "model."), ("model.visual.", "visual.")]

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__(cfg, backend, max_positions)
        tower = get_encoder_class(cfg.architecture)
        device = self.lm_head.weight.device
        self.visual = tower.from_config(cfg.hf_config.vision_config, cfg.dtype, device, backend)
        self.encoder_graphs = None  # an EncoderGraphs wrapper, see enable_cuda_graphs

    def enable_cuda_graphs(self) -> None:
        """Replay CUDA graphs for small repeated tower calls (the tower must opt in)."""
        if getattr(self.visual, "supports_cuda_graphs", False):
            from polymodal.encoders.graphs import EncoderGraphs

            self.encoder_graphs = EncoderGraphs(self.visual)

    def stage(self, items: list) -> None:
        """Make items' pixel values on the model's device, in its dtype (idempotent).

        The processor leaves resized uint8 frames (`MultimodalItem.pixel_values`): they are
        copied (pinned + async on CUDA: no wait for the engine's queued work; 4x+ fewer bytes
        than bf16 pixels), then patchified and normalized there, so the host does no copy and
        no float work. Safe to call from a preprocessing thread, so this overlaps the engine's
        work instead of running inside a step.
        """
        device, dtype = self.lm_head.weight.device, self.lm_head.weight.dtype
        move = partial(copy_to, device=device)
        for it in items:
            pixels = it.data.get("pixel_values")
            if pixels is None or pixels.device != device or pixels.dtype != dtype:
                it.set_pixel_values(it.pixel_values(dtype, move))

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call for all `items` (images and video alike) -> `[num_slots, hidden]` each."""
        self.stage(items)
        pixels = torch.cat([it.data["pixel_values"] for it in items])  # on the device
        grid = torch.cat([it.data["grid_thw"].reshape(-1, 3) for it in items])
        tower = self.encoder_graphs or self.visual
        embeds = tower(pixels, grid)  # grid stays on the host
        return list(embeds.split([it.num_slots for it in items]))
