"""LLaVA-style models: a Llama-family decoder (Llama, Mistral, Qwen2 text configs) whose image
(and video) slots are filled by the encoder its registry row names (this file imports no
encoder): LLaVA-1.5 (`LlavaForConditionalGeneration`, also Pixtral-12B's transformers form),
LLaVA-NeXT (`LlavaNextForConditionalGeneration`), LLaVA-OneVision
(`LlavaOnevisionForConditionalGeneration`) and Mistral 3 (`Mistral3ForConditionalGeneration`).
Attention over media tokens is causal, as in the reference; positions are 1-D.
"""

from __future__ import annotations

import torch

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.llama import Flavor, LlamaForCausalLM
from polymodal.llm_core.models.llava_tiny import TINY_CONFIGS  # noqa: F401 (demo checkpoints)

_VISION = "vision."
# Text model types whose attention differs from Llama's defaults (biases by config otherwise).
TEXT_FLAVORS = {"qwen2": Flavor(qkv_bias=True, qk_norm=False, o_bias=False)}


class LlavaForConditionalGeneration(SupportsMultiModal, LlamaForCausalLM):
    """Decoder + image encoder; `encode(items)` gives each image's slot rows."""

    embeddable = True  # `runner="pooling"`: a multimodal embedding model (E5-V: LLaVA-NeXT)

    # transformers v5 (`model.language_model.`, `model.vision_tower.`), the hub's v4 layout
    # (`language_model.model.`, `vision_tower.vision_model.`), and v5's saved form (no
    # `vision_model.` level): all onto the decoder's `model.` and the encoder's `vision.`
    weight_name_remap = [
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.vision_tower.vision_model.", _VISION + "vision_tower."),
        ("vision_tower.vision_model.", _VISION + "vision_tower."),
        ("model.vision_tower.", _VISION + "vision_tower."),
        ("vision_tower.", _VISION + "vision_tower."),
        ("model.multi_modal_projector.", _VISION + "multi_modal_projector."),
        ("multi_modal_projector.", _VISION + "multi_modal_projector."),
        ("model.image_newline", _VISION + "image_newline"),
        ("image_newline", _VISION + "image_newline"),
    ]

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__(cfg, backend, max_positions)
        device = self.lm_head.weight.device
        self.vision = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)

    def flavor(self, cfg: ModelConfig) -> Flavor:
        flavor = TEXT_FLAVORS.get(getattr(cfg.text_config, "model_type", None))
        return flavor or super().flavor(cfg)

    def encode(self, items: list) -> list[torch.Tensor]:
        self.stage(items)
        return self.vision.encode(items)

    def enable_cuda_graphs(self, wrap) -> None:
        """Replay the CLIP / SigLIP tower + projector per view count (fixed-size views: one
        448 px image's 1 + 4 views run 24 layers eager, bound by their launches); Pixtral's
        and Mistral 3's per image size, one image a call."""
        if hasattr(self.vision, "graphs"):
            self.vision.graphs = wrap(self.vision.features)
