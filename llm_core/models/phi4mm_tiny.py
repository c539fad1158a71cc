"""Tiny Phi-4-multimodal checkpoints in transformers' layout: the tiny Phi-3-style decoder
(partial rotary), a 64 px SigLIP of 2 px patches (32 x 32 patches a crop: the processor's
token count assumes 16 x 16 pooled tokens, as the real 448 / 14 one), a 2-block conformer, the
processor (at most 4 crops an image) and random `vision-lora/` / `speech-lora/` PEFT adapters.
"""

from __future__ import annotations

import json

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


def write_lora(folder, model, rank: int, alpha: int, seed: int) -> None:
    """A random PEFT LoRA adapter (B not zero) on the decoder's LORA_TARGETS."""
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
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.3
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


TINY_CONFIGS = {"phi4mm": _tiny_phi4mm()}
