"""Encoder registry: ONE table from HF architecture name / model type to the encoder class.

Plug in your own encoder with `register_encoder(architecture_name, encoder_cls)`. Two shapes
of encoder are served:
- `Encoder` (every family): `encode(items)` takes the prompt's `MultimodalItem`s (their
  `data`, staged on the device) and returns one tensor `[item.num_embeds, hidden]` each; the
  tower and its projector are one module whose parameter names follow the checkpoint's.
- `VisionEncoder` (Qwen2-VL's patch towers, and custom towers plugged into a Qwen-VL model):
  `forward(pixel_values, grid_thw)` over the concatenated patches of a batch.
Built-in entries are lazy `"module:Class"` strings so that importing the registry does not
import every tower.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import torch

from polymodal.llm_core.errors import UnsupportedModelError


@runtime_checkable
class VisionEncoder(Protocol):
    """What the engine needs from an encoder (an `nn.Module` in practice).

    - `from_config(hf_vision_config, dtype, device, backend)`: classmethod building the
      encoder from the checkpoint's `vision_config` (an HF config object or the plain dict
      from config.json) on `device` in `dtype`, calling `backend.varlen_attention` for
      attention (`None` = the torch reference backend). Parameters may be uninitialized.
    - `load_weights(named_tensors)`: take `(name, tensor)` pairs (or a dict) named as in the
      checkpoint with the `visual.` prefix stripped; raise `ModelLoadError` naming every
      missing, unexpected or mis-shaped tensor.
    - `forward(pixel_values, grid_thw) -> Tensor [num_slots, hidden]`: `pixel_values`
      `[num_patches, C*T*P*P]`, `grid_thw` int `[num_items, 3]`; rows in item order, one per
      prompt slot, `num_slots = num_patches // spatial_merge_size**2`.
    - `spatial_merge_size: int`: patches per slot side (slots of an item = t*h*w / merge^2).
    - optional `frames_attend_alone = True`: each temporal patch of a video is computed alone
      (no attention across them), so the engine may encode a long video in pieces of whole
      temporal patches within its encoder budget (`SupportsMultiModal.split_media`).
    """

    spatial_merge_size: int

    @classmethod
    def from_config(cls, hf_vision_config, dtype, device, backend) -> VisionEncoder: ...

    def load_weights(self, named_tensors) -> None: ...

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Encoder(Protocol):
    """A family's media encoder (tower + projector), as the engine uses it.

    - `from_config(hf_config, dtype, device, backend)`: classmethod building it from the
      checkpoint's whole config (an HF config object: `vision_config`, the projector's fields,
      the text hidden size) on `device` in `dtype`, calling `backend.varlen_attention` for
      attention (`None` = the torch reference). Parameters may be uninitialized: the model's
      loader fills them by name (the encoder keeps the checkpoint's names below its root).
    - `encode(items) -> list[Tensor]`: one `[item.num_embeds, hidden]` per item, in order;
      `item.data` holds what the family's processor made (`pixel_values` staged on the device).
    """

    @classmethod
    def from_config(cls, hf_config, dtype, device, backend) -> Encoder: ...

    def encode(self, items: list) -> list[torch.Tensor]: ...


_QWEN2_VL = "polymodal.encoders.qwen2_vl:Qwen2VisionTower"
_QWEN2_5_VL = "polymodal.encoders.qwen2_5_vl:Qwen2_5VisionTower"

# HF architecture name or config model_type -> encoder class (or its lazy "module:Class").
ENCODERS: dict[str, str | type] = {
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2VLModel": _QWEN2_VL,
    "qwen2_vl": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_5_VL,
    "Qwen2_5_VLModel": _QWEN2_5_VL,
    "qwen2_5_vl": _QWEN2_5_VL,
    "Gemma3ForConditionalGeneration": "polymodal.encoders.gemma3:Gemma3VisionEncoder",
    "LlavaForConditionalGeneration": "polymodal.encoders.llava:LlavaEncoder",
    "LlavaNextForConditionalGeneration": "polymodal.encoders.llava:LlavaNextEncoder",
    "LlavaOnevisionForConditionalGeneration": "polymodal.encoders.llava:LlavaOnevisionEncoder",
    "Mistral3ForConditionalGeneration": "polymodal.encoders.pixtral:Mistral3Encoder",
    "Llama4ForConditionalGeneration": "polymodal.encoders.llama4:Llama4VisionEncoder",
    "LlavaLlamaModel": "polymodal.encoders.vila:VilaEncoder",
    "HCXVisionForCausalLM": "polymodal.encoders.hcx_vision:HCXVisionEncoder",
    "Phi4MMForCausalLM": "polymodal.encoders.phi4mm:Phi4MMEncoder",
    "Phi4MultimodalForCausalLM": "polymodal.encoders.phi4mm:Phi4MMEncoder",
    "MllamaForConditionalGeneration": "polymodal.encoders.mllama:MllamaVisionEncoder",
    "WhisperForConditionalGeneration": "polymodal.encoders.whisper:WhisperAudioEncoder",
}


def register_encoder(architecture_name: str, encoder_cls: type) -> None:
    """Map `architecture_name` (as in config.json's `architectures`, or a `model_type`) to
    `encoder_cls`, replacing any earlier entry. `encoder_cls` must satisfy `Encoder` (or, for
    a Qwen-VL model's tower, `VisionEncoder`)."""
    missing = [attr for attr in ("from_config", "load_weights") if not hasattr(encoder_cls, attr)]
    if not (hasattr(encoder_cls, "encode") or hasattr(encoder_cls, "forward")):
        missing.append("encode (or forward)")
    if missing:
        raise TypeError(f"encoder class {encoder_cls!r} lacks {', '.join(missing)}")
    ENCODERS[architecture_name] = encoder_cls


def get_encoder_class(architecture_name: str) -> type:
    """The encoder class registered for an architecture name or model type.

    Raises UnsupportedModelError listing the known names when there is none.
    """
    entry = ENCODERS.get(architecture_name)
    if entry is None:
        raise UnsupportedModelError(
            f"no encoder registered for {architecture_name!r}; known: {sorted(ENCODERS)}. "
            "Add one with polymodal.encoders.register_encoder(name, cls)."
        )
    if isinstance(entry, str):
        module_name, class_name = entry.split(":")
        entry = getattr(importlib.import_module(module_name), class_name)
    return entry


def encoder_class_for_config(config: dict) -> type:
    """The encoder class for a checkpoint's config.json dict: first registered name among its
    `architectures`, else its `model_type`."""
    candidates = [*(config.get("architectures") or []), config.get("model_type")]
    for name in candidates:
        if name in ENCODERS:
            return get_encoder_class(name)
    raise UnsupportedModelError(
        f"no encoder registered for architectures/model_type {candidates}; known: "
        f"{sorted(ENCODERS)}. Add one with polymodal.encoders.register_encoder(name, cls)."
    )
