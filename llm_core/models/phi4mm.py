"""Phi-4-multimodal: the Phi-4-mini decoder (Phi-3's: packed qkv / gate_up, partial rotary,
LongRoPE) fed by the encoder its registry row names (`encoders/phi4mm.py`: SigLIP with dynamic
HD crops, the conformer speech encoder; this file imports no encoder).

Two checkpoint layouts load:
- transformers' `Phi4MultimodalForCausalLM` (`model.embed_tokens_extend.{image,audio}_embed.*`
  with transformers' names; the LoRA adapters as PEFT folders `vision-lora/`, `speech-lora/`);
- the hub's remote-code `Phi4MMForCausalLM` (model_type `phi4mm`): the same tensors under other
  names (`HUB_RENAMES`), the decoder's adapted linears as `<layer>.base_layer.weight` with their
  adapters inside the checkpoint (`<layer>.lora_A.vision.weight`, `...lora_B.speech.weight`;
  rank and alpha in config.json's `vision_lora` / `speech_lora`).

The adapters are applied per request from its media (`modality_adapter`, the hub code's
choice): an image (with or without audio) -> `vision`, audio only -> `speech`, text -> none.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from polymodal.llm_core import weights
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.llama import LlamaForCausalLM
from polymodal.llm_core.models.phi4mm_tiny import TINY_CONFIGS  # noqa: F401 (demo checkpoints)

_ROOT = "mm."  # our encoder's root (HF: model.embed_tokens_extend.)
_IMG, _AUD = "model.embed_tokens_extend.image_embed.", "model.embed_tokens_extend.audio_embed."
# hub name (regex) -> transformers name; applied before the prefix remap
HUB_RENAMES = [
    (re.escape(_IMG) + r"img_projection\.0\.", _IMG + "img_projection_up."),
    (re.escape(_IMG) + r"img_projection\.2\.", _IMG + "img_projection_down."),
    (re.escape(_IMG) + r"glb_GN$", _IMG + "global_img_feature_extensor"),
    (re.escape(_IMG) + r"sub_GN$", _IMG + "sub_img_feature_extensor"),
    (re.escape(_AUD) + r"audio_projection\.speech\.0\.", _AUD + "up_proj_for_speech."),
    (re.escape(_AUD) + r"audio_projection\.speech\.2\.", _AUD + "down_proj_for_speech."),
    (re.escape(_AUD) + r"audio_projection\.vision\.0\.", _AUD + "up_proj_for_vision_speech."),
    (re.escape(_AUD) + r"audio_projection\.vision\.2\.", _AUD + "down_proj_for_vision_speech."),
    (r"\.feed_forward_(in|out)\.net\.0\.linear\.", r".feed_forward_\1.gate_up_proj."),
    (r"\.feed_forward_(in|out)\.net\.2\.", r".feed_forward_\1.down_proj."),
    (r"\.self_attn\.linear_(q|k|v)\.", r".self_attn.\1_proj."),
    (r"\.self_attn\.linear_out\.", r".self_attn.o_proj."),
    (r"\.base_layer\.", "."),
]
_HUB_RENAMES = [(re.compile(a), b) for a, b in HUB_RENAMES]
_LORA = re.compile(r"^(.*)\.lora_([AB])\.(\w+)\.weight$")
ADAPTERS = ("vision", "speech")
PEFT_FOLDERS = {"vision": "vision-lora", "speech": "speech-lora"}


def hub_name(name: str) -> str:
    """A hub checkpoint tensor's transformers name."""
    for pattern, new in _HUB_RENAMES:
        name = pattern.sub(new, name)
    return name


class Phi4MMForCausalLM(SupportsMultiModal, LlamaForCausalLM):
    """Phi-4-mini decoder + image and speech encoders; both checkpoint layouts."""

    weight_name_remap = [("model.embed_tokens_extend.", _ROOT)]
    # SigLIP's pooling head, which Phi-4-MM never runs
    ignored_weights = (r"img_processor\.head\.",)

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__(cfg, backend, max_positions)
        device = self.lm_head.weight.device
        self.mm = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)
        self.model_dir = Path(cfg.model_dir)
        # adapters found inside the checkpoint (hub layout): name -> {tensor name: tensor}
        self.checkpoint_loras: dict[str, dict[str, torch.Tensor]] = {}

    def load_weights(self, named_tensors, source: str = "checkpoint") -> None:
        """Either layout: hub names renamed, in-checkpoint LoRA tensors set aside (CPU)."""

        def renamed():
            for name, tensor in named_tensors:
                found = _LORA.match(name)
                if found is not None:
                    key = f"{found.group(1)}.lora_{found.group(2)}.weight"
                    self.checkpoint_loras.setdefault(found.group(3), {})[key] = tensor.cpu()
                    continue
                yield hub_name(name), tensor

        weights.load_weights(
            self, renamed(), source, packed=self.packed_modules_mapping,
            remap=self.weight_name_remap, ignore=self.ignored_weights, tied=self.tied_parameters,
        )  # fmt: skip

    def encode(self, items: list) -> list[torch.Tensor]:
        """Each image's / clip's embedding rows (`[item.num_embeds, hidden]`)."""
        self.stage(items)
        return self.mm.encode(items)

    # ---- modality adapters ----------------------------------------------------------------
    def builtin_adapters(self) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
        """name -> (PEFT-style config, tensors named `<module>.lora_{A,B}.weight`): the
        checkpoint's own (hub layout) or its `vision-lora/` / `speech-lora/` PEFT folders."""
        found = {}
        raw = _read_json(self.model_dir / "config.json")
        for name in ADAPTERS:
            if name in self.checkpoint_loras:
                section = raw.get(f"{name}_lora") or {}
                config = {"r": section.get("r", 8), "lora_alpha": section.get("lora_alpha", 8)}
                found[name] = (config, self.checkpoint_loras[name])
                continue
            folder = self.model_dir / PEFT_FOLDERS[name]
            if (folder / "adapter_config.json").is_file():
                found[name] = (folder, None)
        return found

    @staticmethod
    def modality_adapter(mm_items: list) -> str | None:
        """The adapter a prompt runs with: vision for any image, speech for audio only."""
        kinds = {item.modality for item in mm_items}
        if "image" in kinds:
            return "vision"
        return "speech" if "audio" in kinds else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
