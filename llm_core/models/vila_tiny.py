"""Tiny random VILA / NVILA checkpoints in the hub's layout (`llm/`, `vision_tower/`,
`mm_projector/`, a top-level config.json), for the demo and the tests.

`VilaCheckpoint` holds transformers' decoder (`AutoModelForCausalLM`) and `SiglipVisionModel`
plus the projector's parameters under VILA's names, and writes each part with its own
`save_pretrained`, as VILA's `LlavaMetaModel.save_pretrained` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from polymodal.llm_core.models.tiny import TinyConfig

# VILA's `qwen2.jinja` (NVILA): a system turn, then ChatML turns with string contents
QWEN2_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages if message['content'] is not none %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# VILA 1.5's `vicuna_v1` conversation (3B / 13B), as a chat template
VICUNA_TEMPLATE = (
    "{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user\\'s questions.' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ ' USER: ' + message['content'] }}{% else %}{{ ' ASSISTANT: ' + message['content'] + "
    "'</s>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)
MEDIA_TOKENS = {
    "image_token": "<image>",
    "video_token": "<vila/video>",
    "sentinel_token": "<vila/sentinel>",
}
# SigLIP-like tiny towers: 7 px patches; 28 px (4 x 4 patches) or 35 px (5 x 5: an odd grid
# the 2 x 2 fold pads)
TINY_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=28,
    patch_size=7,
)
# the demo names: (text model type, VILA config fields, vision overrides)
VARIANTS = {
    # NVILA: Qwen2, dynamic S2 over three scales (9 to 12 tiles at the last), 2 x 2 fold,
    # video frames averaged in pairs
    "nvila": (
        "qwen2",
        dict(
            image_aspect_ratio="dynamic_s2",
            dynamic_s2=True,
            s2_scales="28,56,84",
            s2_max_split_size=28,
            s2_resize_output_to_scale_idx=-1,
            max_tiles=12,
            mm_projector="mlp_downsample",
            num_video_frames=4,
            video_encoder={
                "_target_": "llava.model.encoders.TSPVideoEncoder",
                "pool_sizes": [[2, 1, 1]],
            },
        ),
        {},
    ),
    # NVILA-Lite: Qwen2, `dynamic` tiles (+ thumbnail) each a view of its own, 3 x 3 fold
    "nvila_lite": (
        "qwen2",
        dict(
            image_aspect_ratio="dynamic",
            min_tiles=1,
            max_tiles=4,
            mm_projector="mlp_downsample_3x3_fix",
            num_video_frames=3,
        ),
        {"vision_use_head": False},
    ),
    # VILA 1.5: Llama, one resized 35 px view (5 x 5 patches, padded to 6 x 6 by the fold)
    "vila1.5": (
        "llama",
        dict(image_aspect_ratio="resize", mm_projector="mlp_downsample", num_video_frames=3),
        {"image_size": 35, "vision_use_head": False},
    ),
}


class _Projector(nn.Module):
    """The projector's parameters under VILA's names (`layers.<i>`): the two kinds the tiny
    checkpoints use."""

    def __init__(self, kind: str, mm_hidden: int, hidden: int) -> None:
        super().__init__()
        if kind == "mlp_downsample":
            m = 4 * mm_hidden
            parts = [nn.Identity(), nn.LayerNorm(m), nn.Linear(m, hidden), nn.GELU()]
        elif kind == "mlp_downsample_3x3_fix":
            m = 9 * mm_hidden
            parts = [nn.Identity(), nn.LayerNorm(m), nn.Linear(m, 3 * mm_hidden), nn.GELU()]
            parts += [nn.LayerNorm(3 * mm_hidden), nn.Linear(3 * mm_hidden, hidden), nn.GELU()]
        else:
            raise ValueError(f"no tiny projector of kind {kind!r}")
        self.layers = nn.Sequential(*parts, nn.Linear(hidden, hidden))


class VilaCheckpoint(nn.Module):
    """The three parts of a VILA checkpoint, written in the hub's folder layout."""

    def __init__(self, config, dtype) -> None:
        super().__init__()
        import transformers as tf

        self.config = config
        self.llm = tf.AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
        self.vision_tower = tf.SiglipVisionModel._from_config(config.vision_config, dtype=dtype)
        scales = max(1, len(config.s2_scales)) if config.dynamic_s2 else 1
        mm_hidden = config.vision_config.hidden_size * scales
        kind = config.mm_projector_cfg["mm_projector_type"]
        self.mm_projector = _Projector(kind, mm_hidden, config.text_config.hidden_size)
        self.to(dtype)

    def save_pretrained(self, out) -> None:
        import transformers as tf
        from safetensors.torch import save_file

        out = Path(out)
        self.llm.save_pretrained(out / "llm")
        # the hub's towers were saved by transformers 4.x: names under `vision_model.`
        tower = out / "vision_tower"
        tower.mkdir(parents=True, exist_ok=True)
        self.vision_tower.config.save_pretrained(tower)
        state = self.vision_tower.state_dict()
        save_file(
            {"vision_model." + k: v.contiguous() for k, v in state.items()},
            str(tower / "model.safetensors"),
            metadata={"format": "pt"},
        )
        side = self.config.s2_scales[0] if self.config.dynamic_s2 else None
        side = side or self.config.vision_config.image_size
        tf.SiglipImageProcessor(size={"height": side, "width": side}).save_pretrained(
            out / "vision_tower"
        )
        (out / "mm_projector").mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.mm_projector.state_dict().items()}
        save_file(tensors, str(out / "mm_projector" / "model.safetensors"))
        projector = {**self.config.mm_projector_cfg, "model_type": "v2l_projector"}
        (out / "mm_projector" / "config.json").write_text(json.dumps(projector, indent=2))
        top = {k: v for k, v in self.config.to_dict().items() if not k.endswith("_config")}
        top.update(
            llm_cfg=json.loads((out / "llm" / "config.json").read_text()),
            vision_tower_cfg=json.loads((out / "vision_tower" / "config.json").read_text()),
            mm_projector_cfg=projector,
            s2_scales=",".join(map(str, self.config.s2_scales)) or None,
        )
        top.pop("video_pool_sizes", None)
        (out / "config.json").write_text(json.dumps(top, indent=2))


def _tiny(name: str) -> TinyConfig:
    text_type, variant, vision = VARIANTS[name]

    def build(kwargs: dict, ids: dict):
        from polymodal.llm_core.models.vila import VilaConfig

        fields = dict(variant)
        text = {**kwargs, "model_type": text_type, "tie_word_embeddings": False}
        if text_type == "llama":
            text["head_dim"] = 16
        kind = fields.pop("mm_projector", None) or "mlp_downsample"
        return VilaConfig(
            architectures=["LlavaLlamaModel"],
            llm_cfg=text,
            vision_tower_cfg={**TINY_SIGLIP, **vision},
            mm_projector_cfg={"mm_projector_type": kind},
            mm_vision_select_layer=-2,
            mm_vision_select_feature="cls_patch",
            model_dtype="torch.float32",
            **fields,
        )

    def move_tokenizer(out, tokenizer) -> None:
        """The hub keeps the tokenizer in `llm/`, not the root."""
        out = Path(out)
        for path in tokenizer.save_pretrained(out / "llm"):
            (out / Path(path).name).unlink(missing_ok=True)

    tokens = dict(MEDIA_TOKENS)
    if text_type == "llama":
        tokens.update(bos_token="<s>", eos_token="</s>")
    return TinyConfig(
        "LlavaLlamaModel",
        build=build,
        make_model=lambda config, dtype: VilaCheckpoint(config, dtype or torch.float32),
        write_extra=move_tokenizer,
        tokens=tokens,
        chat_template=VICUNA_TEMPLATE if text_type == "llama" else QWEN2_TEMPLATE,
    )


TINY_CONFIGS = {name: _tiny(name) for name in VARIANTS}
