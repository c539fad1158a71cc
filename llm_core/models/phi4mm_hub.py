"""The hub's own Phi-4-multimodal layout (`microsoft/Phi-4-multimodal-instruct`: model_type
`phi4mm`, architecture `Phi4MMForCausalLM`, remote code) read into transformers' terms.

- config.json -> a `Phi4MultimodalConfig` (`Phi4MMConfig.from_pretrained`), as transformers'
  `convert_phi4_multimodal_weights_to_hf.py` maps it: `audio_processor.config` (the conformer:
  `attention_dim`, `attention_heads`, `linear_units`, `nemo_conv_settings`,
  `relative_attention_bias_args`, ...) -> `audio_config`; `embd_layer.image_embd_layer.crop_size`
  -> `vision_config.crop_size`; `embd_layer.audio_embd_layer.downsample_rate` ->
  `audio_config.downsample_rate`; `vision_lora` / `speech_lora` (r, lora_alpha) kept as they
  are. The hub publishes `img_processor: null` (its code builds SigLIP-so400m-patch14-448,
  which are `Phi4MultimodalVisionConfig`'s defaults); a dict there may set `layer_idx` (the
  feature layer) and the tower's sizes (`hidden_size`, `image_size`, ...: the tiny checkpoints
  do). Embedding variants the hub code has but the published model does not use (a CLIP tower,
  Q-Former, other HD orders) raise `UnsupportedModelError`.
- tensor names -> transformers' (`HUB_RENAMES`, the same script's table); the decoder's adapted
  linears are `<layer>.base_layer.weight` with their adapters beside them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from polymodal.llm_core.errors import ModelLoadError, UnsupportedModelError

_IMG, _AUD = "model.embed_tokens_extend.image_embed.", "model.embed_tokens_extend.audio_embed."
# hub name (regex) -> transformers name
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

# hub conformer key -> transformers' `Phi4MultimodalAudioConfig` field
_AUDIO_RENAMES = {
    "attention_dim": "hidden_size",
    "attention_heads": "num_attention_heads",
    "linear_units": "intermediate_size",
    "depthwise_seperable_out_channel": "depthwise_separable_out_channel",  # (sic) on the hub
}
_AUDIO_DROPPED = (
    "activation_checkpointing", "cnn_layer_norm", "input_layer", "batch_norm",
    "encoder_embedding_config", "ext_pw_kernel_size", "bias_in_glu", "causal",
)  # fmt: skip
# what our encoder implements; anything else in config.json's `embd_layer` is another model
_IMAGE_EXPECTED = {"use_hd_transform": True, "with_learnable_separator": True,
                   "hd_transform_order": "sub_glb", "image_token_compression_cls": "avg_pool_2d",
                   "projection_cls": "mlp"}  # fmt: skip
_AUDIO_EXPECTED = {"projection_cls": "mlp", "use_qformer": False, "use_conv_downsample": False}
# the top-level keys transformers' config does not take
_TOP_DROPPED = ("_name_or_path", "auto_map", "transformers_version", "_attn_implementation",
                "model_type", "embd_layer", "audio_processor", "img_processor")  # fmt: skip


def hub_name(name: str) -> str:
    """A hub checkpoint tensor's transformers name."""
    for pattern, new in _HUB_RENAMES:
        name = pattern.sub(new, name)
    return name


def _check(section: dict, expected: dict, what: str) -> None:
    for key, want in expected.items():
        if key in section and section[key] != want:
            raise UnsupportedModelError(
                f"Phi-4-multimodal config.json: {what}.{key} = {section[key]!r}; only {want!r} "
                "(the published model's) is implemented"
            )


def hub_config_dict(raw: dict) -> dict:
    """The hub's config.json (model_type `phi4mm`) as `Phi4MultimodalConfig` keyword args."""
    config = {k: v for k, v in raw.items() if k not in _TOP_DROPPED}
    embd = raw.get("embd_layer") or {}
    image_embd, audio_embd = embd.get("image_embd_layer") or {}, embd.get("audio_embd_layer") or {}
    _check(image_embd, _IMAGE_EXPECTED, "embd_layer.image_embd_layer")
    _check(audio_embd, _AUDIO_EXPECTED, "embd_layer.audio_embd_layer")

    processor = raw.get("audio_processor") or {}
    if processor.get("name", "cascades") != "cascades":
        name = processor["name"]
        raise UnsupportedModelError(f"audio_processor.name = {name!r}: not the conformer")
    audio = {k: v for k, v in (processor.get("config") or {}).items() if k not in _AUDIO_DROPPED}
    audio = {_AUDIO_RENAMES.get(k, k): v for k, v in audio.items()}
    if "nemo_conv_settings" in audio:
        audio["nemo_conv_channels"] = audio.pop("nemo_conv_settings")["conv_channels"]
    if "relative_attention_bias_args" in audio:
        bias = audio.pop("relative_attention_bias_args")
        if bias.get("type", "t5") != "t5":
            raise UnsupportedModelError(f"relative attention bias {bias['type']!r}: only t5")
        audio["bias_max_distance"] = bias["t5_bias_max_distance"]
    if "downsample_rate" in audio_embd:
        audio["downsample_rate"] = audio_embd["downsample_rate"]

    vision = dict(raw.get("img_processor") or {})
    if vision.pop("name", "siglip_vision_model") != "siglip_vision_model":
        raise UnsupportedModelError("img_processor: only the SigLIP tower is implemented")
    if vision.pop("type_feature", "patch") != "patch":
        raise UnsupportedModelError("img_processor.type_feature: only 'patch' is implemented")
    if "layer_idx" in vision:
        vision["feature_layer"] = vision.pop("layer_idx")
    if "crop_size" in image_embd:
        vision["crop_size"] = image_embd["crop_size"]
    return {**config, "audio_config": audio, "vision_config": vision}


class Phi4MMConfig:
    """`hf_config_class` of Phi-4-multimodal: transformers' config for its own layout, the hub
    config.json converted (`hub_config_dict`) for the hub's; `vision_lora` / `speech_lora` stay
    attributes (dicts with `r`, `lora_alpha`) of the result."""

    @staticmethod
    def from_pretrained(model_dir: str | Path):
        """The `Phi4MultimodalConfig` of either layout's config.json in `model_dir`."""
        import transformers as tf

        raw = json.loads((Path(model_dir) / "config.json").read_text())
        if raw.get("model_type") != "phi4mm":
            return tf.AutoConfig.from_pretrained(model_dir)
        try:
            return tf.Phi4MultimodalConfig(**hub_config_dict(raw))
        except (TypeError, KeyError) as exc:
            raise ModelLoadError(
                f"{model_dir}/config.json: not a Phi-4-multimodal config: {exc}"
            ) from exc
