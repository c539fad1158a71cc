"""Phi-4-multimodal: the Phi-4-mini decoder (Phi-3's: packed qkv / gate_up, partial rotary,
LongRoPE) fed by the encoder its registry row names (`encoders/phi4mm.py`: SigLIP with dynamic
HD crops, the conformer speech encoder; this file imports no encoder).

Two checkpoint layouts load:
- transformers' `Phi4MultimodalForCausalLM` (`model.embed_tokens_extend.{image,audio}_embed.*`
  with transformers' names; the LoRA adapters as PEFT folders `vision-lora/`, `speech-lora/`);
- the hub's remote-code `Phi4MMForCausalLM` (model_type `phi4mm`; its config.json converted by
  `phi4mm_hub.Phi4MMConfig`): the same tensors under other names (`phi4mm_hub.HUB_RENAMES`),
  the decoder's adapted linears as `<layer>.base_layer.weight` with their adapters inside the
  checkpoint (`<layer>.lora_A.vision.weight`, `...lora_B.speech.weight`; rank and alpha in
  config.json's `vision_lora` / `speech_lora`).

The adapters are applied per request from its media (`modality_adapter`, the hub code's
choice): an image (with or without audio) -> `vision`, audio only -> `speech`, text -> none.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from polymodal.llm_core import weights
from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.llama import LlamaForCausalLM
from polymodal.llm_core.models.phi4mm_hub import Phi4MMConfig, hub_name
from polymodal.llm_core.models.phi4mm_tiny import TINY_CONFIGS  # noqa: F401 (demo checkpoints)

_ROOT = "mm."  # our encoder's root (HF: model.embed_tokens_extend.)
_LORA = re.compile(r"^(.*)\.lora_([AB])\.(\w+)\.weight$")
ADAPTERS = ("vision", "speech")
PEFT_FOLDERS = {"vision": "vision-lora", "speech": "speech-lora"}


class Phi4MMForCausalLM(SupportsMultiModal, LlamaForCausalLM):
    """Phi-4-mini decoder + image and speech encoders; both checkpoint layouts."""

    hf_config_class = Phi4MMConfig  # reads the hub's config.json too (phi4mm_hub.py)
    weight_name_remap = [("model.embed_tokens_extend.", _ROOT)]
    # SigLIP's pooling head, which Phi-4-MM never runs
    ignored_weights = (r"img_processor\.head\.",)

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__(cfg, backend, max_positions)
        device = self.lm_head.weight.device
        self.mm = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)
        self.model_dir = Path(cfg.model_dir)
        # config.json's `vision_lora` / `speech_lora` (hub layout): {"r": ..., "lora_alpha": ...}
        self.lora_sections = {n: getattr(cfg.hf_config, f"{n}_lora", None) for n in ADAPTERS}
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
        for name in ADAPTERS:
            if name in self.checkpoint_loras:
                section = self.lora_sections[name] or {}
                if "r" not in section or "lora_alpha" not in section:
                    raise ModelLoadError(
                        f"{self.model_dir}: the checkpoint holds {name} LoRA tensors but "
                        f"config.json's {name}_lora has no r / lora_alpha ({section})"
                    )
                config = {"r": int(section["r"]), "lora_alpha": section["lora_alpha"]}
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
