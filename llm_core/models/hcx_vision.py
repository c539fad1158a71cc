"""HyperCLOVA X SEED Vision (`HCXVisionForCausalLM`, config `model_type: hyperclovax_vlm`): a
Llama-style decoder whose image slots are filled by the encoder its registry row names (SigLIP +
C-Abstractor + anyres packing: `encoders/hcx_vision.py`; this file imports no encoder).
transformers has no class for it; `HCXVisionConfig` parses the published config.json.

The checkpoint is one folder (the hub's remote-code layout): `language_model.*` (the decoder, a
`LlamaForCausalLM` built from `language_config`), `vision_model.*` (a `SiglipVisionModel`,
saved by transformers 4 with its `vision_model.` level), `mm_projector.*` (the C-Abstractor,
timm's names) and `image_newline`. Attention over image tokens is causal and positions are
1-D, as in the published model (its decoder runs on `inputs_embeds`).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, PretrainedConfig

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import ModelLoadError
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.hcx_vision_tiny import TINY_CONFIGS  # noqa: F401 (demo checkpoints)
from polymodal.llm_core.models.llama import LlamaForCausalLM

_V = "vision."
# decoders the published configs name and this file serves (the Llama family's)
TEXT_MODEL_TYPES = ("llama",)


class HCXVisionConfig(PretrainedConfig):
    """The config of a HyperCLOVA X SEED Vision checkpoint (`model_type: hyperclovax_vlm`).

    `text_config` / `vision_config` are built from `language_config` (the published name; also
    read as `text_config`) and `vision_config`; the media fields (`anyres`, `unpad`,
    `max_num_grids`, `use_1x1_grid`, `num_queries_vis_abstractor_image`, `use_nth_layer`,
    `mm_projector_type`, `proj_pos_emb`, `proj_prenorm`, `image_token_id`, ...) stay as published.
    """

    model_type = "hyperclovax_vlm"

    def __init__(
        self,
        language_config: dict | None = None,
        vision_config: dict | None = None,
        use_nth_layer: int = -2,
        anyres: bool = False,
        unpad: bool = False,
        max_num_grids: int = -1,
        use_1x1_grid: bool = False,
        proj_pos_emb: bool = True,
        proj_prenorm: bool = False,
        **kwargs,
    ):
        language = kwargs.pop("text_config", None) or language_config or {"model_type": "llama"}
        self.language_config = _plain(language)
        self.text_config = _sub_config(self.language_config)
        self.vision_config = _sub_config(
            _plain(vision_config or {"model_type": "siglip_vision_model"})
        )
        self.use_nth_layer = use_nth_layer
        self.anyres, self.unpad = anyres, unpad
        self.max_num_grids, self.use_1x1_grid = max_num_grids, use_1x1_grid
        self.proj_pos_emb, self.proj_prenorm = proj_pos_emb, proj_prenorm
        kwargs.setdefault("eos_token_id", self.text_config.eos_token_id)
        kwargs.setdefault("tie_word_embeddings", self.text_config.tie_word_embeddings)
        super().__init__(**kwargs)

    def get_text_config(self, *args, **kwargs):
        return self.text_config

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["language_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out.pop("text_config", None)
        return out


def _plain(values) -> dict:
    return values.to_dict() if isinstance(values, PretrainedConfig) else dict(values)


def _sub_config(values: dict) -> PretrainedConfig:
    """A transformers config from a published sub-config dict (its `model_type` picks the
    class; bookkeeping keys such as `_name_or_path` and remote-code `auto_map` dropped)."""
    values = {k: v for k, v in values.items() if not k.startswith("_") and k != "auto_map"}
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"a HyperCLOVA X SEED Vision sub-config lacks model_type: {values}")
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError:
        raise ModelLoadError(
            f"a HyperCLOVA X SEED Vision part of model_type {model_type!r} is not supported "
            "(served: a SigLIP tower, a Llama decoder)"
        ) from None


class HCXVisionForCausalLM(SupportsMultiModal, LlamaForCausalLM):
    """HyperCLOVA X SEED Vision: the decoder of `language_model.*` plus the image encoder."""

    hf_config_class = HCXVisionConfig
    # the checkpoint's tensors onto the decoder's `model.` / `lm_head.` and the encoder's
    # `vision.`; a tower saved by transformers 5 has no `vision_model.` level of its own
    weight_name_remap = [
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_model.vision_model.", _V + "vision_tower."),
        ("vision_model.", _V + "vision_tower."),
        ("mm_projector.", _V + "mm_projector."),
        ("image_newline", _V + "image_newline"),
    ]
    # SigLIP's pooling head, which the model never runs
    ignored_weights = (r"^vision_model\.(vision_model\.)?head\.",)

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        text_type = getattr(cfg.text_config, "model_type", None)
        if text_type not in TEXT_MODEL_TYPES:
            raise ModelLoadError(
                f"HyperCLOVA X SEED Vision with a {text_type!r} language model is not supported "
                f"(served: {', '.join(TEXT_MODEL_TYPES)})"
            )
        super().__init__(cfg, backend, max_positions)
        device = self.lm_head.weight.device
        self.vision = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an image token past the decoder's vocabulary embeds as token 0 (its rows are
        # replaced by the encoder's anyway)
        vocab = self.config.vocab_size
        return self.model.embed_tokens(torch.where(input_ids < vocab, input_ids, 0))

    def encode(self, items: list) -> list[torch.Tensor]:
        self.stage(items)
        return self.vision.encode(items)
