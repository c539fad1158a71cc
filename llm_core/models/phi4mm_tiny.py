"""Tiny Phi-4-multimodal checkpoints in transformers' layout: the tiny Phi-3-style decoder
(partial rotary), a 64 px SigLIP of 2 px patches (32 x 32 patches a crop: the processor's
token count assumes 16 x 16 pooled tokens, as the real 448 / 14 one), a 2-block conformer, the
processor (at most 4 crops an image) and random `vision-lora/` / `speech-lora/` PEFT adapters.

`phi4mm_hub` is the same checkpoint rewritten into the hub's layout (`write_hub_layout`: the
inverse of `phi4mm_hub.py`'s renames and config conversion; the tokenizer and processor files
stay transformers').
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from polymodal.llm_core.models.tiny import TinyConfig

PHI4_TOKENS = {
    "eos_token": "<|end|>",
    "image_token": "<|image|>",
    "audio_token": "<|audio|>",
    "user_token": "<|user|>",
    "assistant_token": "<|assistant|>",
}
PHI4_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image|>{% elif content['type'] == 'audio' %}<|audio|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LORA_RANKS = {"vision": (4, 8), "speech": (6, 6)}  # (r, lora_alpha)


def write_lora(
    folder, model, rank: int, alpha: int, seed: int, std: float = 0.3, dtype=torch.float32
) -> None:
    """A random PEFT LoRA adapter (B not zero; A and B drawn with `std`) on the decoder's
    LORA_TARGETS."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in LORA_TARGETS:
            if not name.startswith("model.layers."):
                continue
            out_f, in_f = module.weight.shape
            key = f"base_model.model.{name}"
            a = torch.randn(rank, in_f, generator=gen) * std
            b = torch.randn(out_f, rank, generator=gen) * std
            tensors[f"{key}.lora_A.weight"] = a.to(dtype)
            tensors[f"{key}.lora_B.weight"] = b.to(dtype)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "bias": "none",
              "target_modules": list(LORA_TARGETS), "task_type": "CAUSAL_LM"}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _tiny_phi4mm() -> TinyConfig:
    def build(kwargs: dict, ids: dict):
        import transformers as tf

        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, image_size=64, patch_size=2, crop_size=64,
                      image_token_id=ids["<|image|>"])  # fmt: skip
        audio = dict(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=2,
                     ext_pw_out_channel=32, depthwise_separable_out_channel=32,
                     nemo_conv_channels=16, bias_max_distance=50,
                     audio_token_id=ids["<|audio|>"])  # fmt: skip
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
        kwargs = {**kwargs, "max_position_embeddings": 8192, "rope_parameters": rope}
        return tf.Phi4MultimodalConfig(**kwargs, vision_config=vision, audio_config=audio)

    def make_model(hf_config, dtype):
        import transformers as tf

        model = tf.Phi4MultimodalForCausalLM._from_config(hf_config, dtype=dtype)
        with torch.no_grad():  # random normalization statistics of the features
            enc = model.model.embed_tokens_extend.audio_embed.encoder.encoder_embedding
            enc.global_mean.normal_(0.0, 1.0)
            enc.global_invstd.uniform_(0.1, 0.3)
        return model

    def write_extra(out, tokenizer) -> None:
        import transformers as tf

        processor = tf.Phi4MultimodalProcessor(
            image_processor=tf.Phi4MultimodalImageProcessor(
                size={"height": 64, "width": 64}, patch_size=2, dynamic_hd=4
            ),
            audio_processor=tf.Phi4MultimodalFeatureExtractor(),
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
        )
        processor.save_pretrained(out)
        model = tf.Phi4MultimodalForCausalLM.from_pretrained(out)
        for seed, (name, (rank, alpha)) in enumerate(LORA_RANKS.items()):
            write_lora(out / f"{name}-lora", model, rank, alpha, seed + 1)

    return TinyConfig(
        "Phi4MultimodalForCausalLM",
        build=build,
        make_model=make_model,
        write_extra=write_extra,
        tokens=PHI4_TOKENS,
        chat_template=PHI4_TEMPLATE,
    )


# transformers name (regex) -> hub name: the inverse of phi4mm_hub.HUB_RENAMES
_I, _A = r"(\.image_embed\.)", r"(\.audio_embed\.)"
TO_HUB = [
    (_I + r"img_projection_up\.", r"\1img_projection.0."),
    (_I + r"img_projection_down\.", r"\1img_projection.2."),
    (_I + r"global_img_feature_extensor$", r"\1glb_GN"),
    (_I + r"sub_img_feature_extensor$", r"\1sub_GN"),
    (_A + r"up_proj_for_speech\.", r"\1audio_projection.speech.0."),
    (_A + r"down_proj_for_speech\.", r"\1audio_projection.speech.2."),
    (_A + r"up_proj_for_vision_speech\.", r"\1audio_projection.vision.0."),
    (_A + r"down_proj_for_vision_speech\.", r"\1audio_projection.vision.2."),
    (r"\.feed_forward_(in|out)\.gate_up_proj\.", r".feed_forward_\1.net.0.linear."),
    (r"\.feed_forward_(in|out)\.down_proj\.", r".feed_forward_\1.net.2."),
    (r"(\.encoders\.\d+\.self_attn)\.(q|k|v)_proj\.", r"\1.linear_\2."),
    (r"(\.encoders\.\d+\.self_attn)\.o_proj\.", r"\1.linear_out."),
]
# what the hub's config.json says of the embedding layers (the published values)
_HUB_IMAGE_EMBD = {"embedding_cls": "tune_image", "hd_transform_order": "sub_glb",
                   "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp",
                   "use_hd_transform": True, "with_learnable_separator": True}  # fmt: skip
_HUB_AUDIO_EMBD = {"compression_rate": 8, "embedding_cls": "audio", "projection_cls": "mlp",
                   "use_conv_downsample": False, "use_qformer": False}  # fmt: skip


def to_hub_name(name: str) -> str:
    """A transformers-layout tensor name in the hub's layout (decoder LoRA bases aside)."""
    for pattern, new in TO_HUB:
        name = re.sub(pattern, new, name)
    return name


def hub_config(config: dict, loras: dict[str, dict]) -> dict:
    """transformers' config.json (a dict) -> the hub's (model_type `phi4mm`); `loras`: each
    adapter's PEFT adapter_config."""
    config = dict(config)
    audio, vision = config.pop("audio_config"), config.pop("vision_config")
    rope = config.pop("rope_parameters")
    for key in ("architectures", "model_type", "transformers_version", "dtype"):
        config.pop(key, None)
    scaling = None
    if rope.get("rope_type", "default") != "default":
        scaling = {"type": rope["rope_type"], "short_factor": rope["short_factor"],
                   "long_factor": rope["long_factor"]}  # fmt: skip
    conformer = {
        "attention_dim": audio["hidden_size"], "attention_heads": audio["num_attention_heads"],
        "linear_units": audio["intermediate_size"], "num_blocks": audio["num_blocks"],
        "nemo_conv_settings": {"conv_channels": audio["nemo_conv_channels"]},
        "relative_attention_bias_args": {"type": "t5",
                                         "t5_bias_max_distance": audio["bias_max_distance"]},
        "depthwise_seperable_out_channel": audio["depthwise_separable_out_channel"],
        "input_layer": "nemo_conv", "causal": True, "batch_norm": False, "bias_in_glu": True,
        "cnn_layer_norm": True, "ext_pw_kernel_size": 1,
        "encoder_embedding_config": {"input_size": audio["input_size"]},
        **{k: audio[k] for k in ("activation", "chunk_size", "left_chunk", "dropout_rate",
           "ext_pw_out_channel", "depthwise_multiplier", "kernel_size", "conv_activation",
           "input_size", "conv_glu_type", "time_reduction")},
    }  # fmt: skip
    tower = {k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "image_size", "patch_size")}  # fmt: skip
    return {
        **config,
        "architectures": ["Phi4MMForCausalLM"],
        "model_type": "phi4mm",
        "torch_dtype": "float32",
        "rope_theta": rope["rope_theta"],
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "rope_scaling": scaling,
        "embd_layer": {
            "embedding_cls": "image_audio",
            "image_embd_layer": {**_HUB_IMAGE_EMBD, "crop_size": vision["crop_size"]},
            "audio_embd_layer": {**_HUB_AUDIO_EMBD, "downsample_rate": audio["downsample_rate"]},
        },
        "audio_processor": {"name": "cascades", "config": conformer},
        # the hub publishes null (SigLIP-so400m); the tiny tower's sizes go here
        "img_processor": {
            "name": "siglip_vision_model",
            "layer_idx": vision["feature_layer"],
            **tower,
        },  # fmt: skip
        **{
            f"{name}_lora": {"r": c["r"], "lora_alpha": c["lora_alpha"], "dp": 0.0}
            for name, c in loras.items()
        },  # fmt: skip
    }


def write_hub_layout(src, dst) -> Path:
    """Rewrite the transformers-layout checkpoint `src` into the hub's layout in `dst` (may be
    `src`): renamed tensors, LoRA-adapted linears as `<layer>.base_layer.weight` beside their
    `<layer>.lora_{A,B}.<adapter>.weight`, the hub's config.json, no PEFT folders."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    loras, adapted, hub = {}, set(), {}
    for name in LORA_RANKS:
        folder = src / f"{name}-lora"
        loras[name] = json.loads((folder / "adapter_config.json").read_text())
        for key, tensor in load_file(str(folder / "adapter_model.safetensors")).items():
            module, _, rest = key.removeprefix("base_model.model.").rpartition(".lora_")
            adapted.add(module)
            hub[f"{module}.lora_{rest[0]}.{name}.weight"] = tensor  # rest: "A.weight"
    for key, tensor in tensors.items():
        module, _, leaf = key.rpartition(".")
        hub[f"{module}.base_layer.{leaf}" if module in adapted else to_hub_name(key)] = tensor
    if dst != src:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*-lora", "model.safetensors",
                                                                "config.json"))  # fmt: skip
    for name in LORA_RANKS:
        shutil.rmtree(dst / f"{name}-lora", ignore_errors=True)
    save_file(hub, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(hub_config(config, loras), indent=2))
    return dst


def _tiny_phi4mm_hub() -> TinyConfig:
    tiny = _tiny_phi4mm()

    def write_extra(out, tokenizer) -> None:
        tiny.write_extra(out, tokenizer)
        write_hub_layout(out, out)

    return TinyConfig(
        "Phi4MMForCausalLM",
        build=tiny.build,
        make_model=tiny.make_model,
        write_extra=write_extra,
        tokens=PHI4_TOKENS,
        chat_template=PHI4_TEMPLATE,
    )


TINY_CONFIGS = {"phi4mm": _tiny_phi4mm(), "phi4mm_hub": _tiny_phi4mm_hub()}
