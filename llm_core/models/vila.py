"""VILA 1.5 and NVILA (`LlavaLlamaModel`, config `llava_llama`): a Llama or Qwen2 decoder whose
image and video slots are filled by the encoder its registry row names (SigLIP + VILA's
projector, NVILA's dynamic S2 and video pooling: `encoders/vila.py`; this file imports no
encoder). transformers has no class for it; `VilaConfig` parses the published config.

The hub publishes these checkpoints as three folders, each a separate `save_pretrained`:
`llm/` (the decoder and the tokenizer), `vision_tower/` (a `SiglipVisionModel`) and
`mm_projector/` (`layers.<i>.*`), next to a top-level config.json whose `llm_cfg`,
`vision_tower_cfg` and `mm_projector_cfg` hold (or name) the three configs. The model reads
them with the folder as a name prefix (`weight_folders`). Attention over media is causal and
positions are 1-D, as in the reference (an `inputs_embeds` run of the decoder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.llama import Flavor, LlamaForCausalLM
from polymodal.llm_core.models.llava import TEXT_FLAVORS
from polymodal.llm_core.models.vila_tiny import TINY_CONFIGS  # noqa: F401 (demo checkpoints)

_V = "vision."
# the published folders and the name prefixes their tensors get (`ModelBase.weight_folders`)
FOLDERS = {"llm": "llm_cfg", "vision_tower": "vision_tower_cfg", "mm_projector": "mm_projector_cfg"}


def video_pool_sizes(video_encoder) -> list[list[int]]:
    """`pool_sizes` of a `TSPVideoEncoder` config (a JSON string or dict); [] for the basic
    video encoder (every frame's tokens kept)."""
    spec = json.loads(video_encoder) if isinstance(video_encoder, str) else dict(video_encoder)
    if not spec.get("_target_", "").endswith("TSPVideoEncoder"):
        return []
    return [list(p) for p in spec["pool_sizes"]]


class VilaConfig(PretrainedConfig):
    """The top-level config of a VILA / NVILA checkpoint (`model_type: llava_llama`).

    `text_config` / `vision_config` are built from `llm_cfg` / `vision_tower_cfg`; the media
    fields (`dynamic_s2`, `s2_scales`, `image_aspect_ratio`, `mm_projector_cfg`,
    `video_encoder`, ...) stay as published, with `s2_scales` parsed into a list of ints.
    """

    model_type = "llava_llama"

    def __init__(
        self,
        llm_cfg: dict | None = None,
        vision_tower_cfg: dict | None = None,
        mm_projector_cfg: dict | None = None,
        **kwargs,
    ):
        self.llm_cfg = dict(llm_cfg or {"model_type": "llama"})
        self.vision_tower_cfg = dict(vision_tower_cfg or {"model_type": "siglip_vision_model"})
        self.mm_projector_cfg = dict(mm_projector_cfg or {"mm_projector_type": "mlp2x_gelu"})
        self.text_config = _sub_config(self.llm_cfg)
        self.vision_config = _sub_config(self.vision_tower_cfg)
        scales = kwargs.pop("s2_scales", None)
        if isinstance(scales, str):
            scales = [int(s) for s in scales.split(",") if s.strip()]
        self.s2_scales = sorted(scales or [])
        self.dynamic_s2 = bool(kwargs.pop("dynamic_s2", False))
        self.video_encoder = kwargs.pop(
            "video_encoder", '{"_target_": "llava.model.encoders.BasicVideoEncoder"}'
        )
        self.video_pool_sizes = video_pool_sizes(self.video_encoder)
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    @classmethod
    def from_pretrained(cls, model_dir, **kwargs) -> VilaConfig:
        """config.json of `model_dir`, each sub-config taken inline or, when it only names its
        folder, from that folder's config.json; the decoder's EOS ids from
        `llm/generation_config.json` too."""
        root = Path(model_dir)
        raw = json.loads((root / "config.json").read_text())
        for folder, key in FOLDERS.items():
            value = raw.get(key)
            if not (
                isinstance(value, dict) and ("model_type" in value or folder == "mm_projector")
            ):
                path = root / folder / "config.json"
                if not path.is_file():
                    raise ModelLoadError(f"{root}: {key} is neither inline nor in {folder}/")
                raw[key] = json.loads(path.read_text())
        generation = root / "llm" / "generation_config.json"
        if "eos_token_id" not in raw and generation.is_file():
            raw["eos_token_id"] = json.loads(generation.read_text()).get("eos_token_id")
        return cls(**raw)


def _sub_config(values: dict) -> PretrainedConfig:
    """A transformers config from a published sub-config dict (its `model_type` picks the
    class; bookkeeping keys such as `_name_or_path` dropped)."""
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"a VILA sub-config lacks model_type: {sorted(values)[:8]}")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError:
        raise ModelLoadError(
            f"a VILA part of model_type {model_type!r} is not supported (served: SigLIP towers, "
            "Llama / Qwen2 decoders)"
        ) from None


class LlavaLlamaModel(SupportsMultiModal, LlamaForCausalLM):
    """VILA / NVILA: the decoder of `llm/` plus the image / video encoder."""

    hf_config_class = VilaConfig
    weight_folders = {folder: folder + "." for folder in FOLDERS}
    tokenizer_folder = "llm"
    # the folders' tensors (and a single-folder save of the whole model, whose tower sits under
    # `vision_tower.vision_tower.`) onto the decoder's `model.` and the encoder's `vision.`
    weight_name_remap = [
        ("llm.model.", "model."),
        ("llm.lm_head.", "lm_head."),
        ("vision_tower.vision_tower.vision_model.", _V + "vision_tower."),
        ("vision_tower.vision_model.", _V + "vision_tower."),
        ("vision_tower.", _V + "vision_tower."),  # a tower saved by transformers 5
        ("mm_projector.", _V + "mm_projector."),
    ]
    # SigLIP's pooling head, which VILA never runs
    ignored_weights = (r"^vision_tower\.(vision_tower\.)?(vision_model\.)?head\.",)

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__(cfg, backend, max_positions)
        device = self.lm_head.weight.device
        self.vision = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)

    def flavor(self, cfg: ModelConfig) -> Flavor:
        flavor = TEXT_FLAVORS.get(getattr(cfg.text_config, "model_type", None))
        return flavor or super().flavor(cfg)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # a media token added past the decoder's vocabulary embeds as token 0 (its rows are
        # replaced by the encoder's anyway)
        vocab = self.config.vocab_size
        return self.model.embed_tokens(torch.where(input_ids < vocab, input_ids, 0))

    def encode(self, items: list) -> list[torch.Tensor]:
        self.stage(items)
        return self.vision.encode(items)
