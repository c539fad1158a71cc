"""Tiny random LLaVA-family checkpoints for the demo and the tests (transformers' own classes
and processors, random weights): LLaVA-1.5 and LLaVA-NeXT (CLIP tower, Llama text), Pixtral-12B's
LLaVA form and Mistral 3 (Pixtral tower, Mistral text), LLaVA-OneVision (SigLIP tower, Qwen2
text). Their chat templates and special tokens are the families' (`polymodal.bench.vl` reuses
them for the shipped configs)."""

from __future__ import annotations

from polymodal.llm_core.models.tiny import TinyConfig

LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# CLIP-like tiny tower: 28 px images of 7 px patches (16 patches + the class token)
TINY_CLIP = dict(
    model_type="clip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=28,
    patch_size=7,
    projection_dim=16,
)
TINY_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def _tiny_llava(arch: str) -> TinyConfig:
    """LLaVA-1.5 (`llava`) or LLaVA-NeXT (`llava_next`) on the tiny Llama text shapes."""
    next_ = arch == "llava_next"

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        text = {**kwargs, "model_type": "llama"}
        common = dict(
            text_config=text,
            vision_config=TINY_CLIP,
            image_token_index=ids["<image>"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        if next_:
            return tf.LlavaNextConfig(**common, image_grid_pinpoints=TINY_PINPOINTS)
        return tf.LlavaConfig(**common)

    def make_model(hf_config, dtype):
        import transformers as tf

        return tf.AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)

    def write_processor(out, tokenizer) -> None:
        import transformers as tf

        sizes = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        common = dict(
            tokenizer=tokenizer,
            patch_size=7,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
        if next_:
            images = tf.LlavaNextImageProcessor(**sizes, image_grid_pinpoints=TINY_PINPOINTS)
            processor = tf.LlavaNextProcessor(image_processor=images, **common)
        else:
            processor = tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(**sizes), **common)
        processor.save_pretrained(out)

    name = "LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"
    return TinyConfig(
        name,
        build=build,
        make_model=make_model,
        write_extra=write_processor,
        tokens={"image_token": "<image>"},
        chat_template=LLAVA_TEMPLATE,
    )


TINY_CONFIGS = {arch: _tiny_llava(arch) for arch in ("llava", "llava_next")}


ONEVISION_TEMPLATE = (  # the hub's: a turn's images, then its videos, then its text
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n"
    "{% endfor %}{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "<video>\n{% endfor %}{% for item in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ item['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION_TOKENS = {"image_token": "<image>", "video_token": "<video>"}
# SigLIP-like tiny tower: 35 px views of 7 px patches, a 5 x 5 feature map (odd, as the
# released 27 x 27: the video pooling rounds up to 3 x 3)
TINY_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=35,
    patch_size=7,
    vision_use_head=False,  # as released: LLaVA reads hidden states, the pooling head is unused
)
# grids up to 4 x 4 tiles: more than anyres_max_9's nine, so large images are resampled
TINY_ONEVISION_PINPOINTS = [[35 * i, 35 * j] for i in range(1, 5) for j in range(1, 5)]


def _tiny_onevision() -> TinyConfig:
    """LLaVA-OneVision on the tiny Qwen2 text shapes; its processor follows the checkpoint's
    feature strategy (a test may override it)."""

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        return tf.LlavaOnevisionConfig(
            text_config={**kwargs, "model_type": "qwen2"},
            vision_config=TINY_SIGLIP,
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=TINY_ONEVISION_PINPOINTS,
            tie_word_embeddings=False,
        )

    def make_model(hf_config, dtype):
        import transformers as tf

        return tf.AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)

    def write_processor(out, tokenizer) -> None:
        import json

        import transformers as tf

        config = json.loads((out / "config.json").read_text())
        pixels = dict(size={"height": 35, "width": 35}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        images = tf.LlavaOnevisionImageProcessor(
            **pixels, image_grid_pinpoints=config["image_grid_pinpoints"]
        )
        processor = tf.LlavaOnevisionProcessor(
            image_processor=images,
            video_processor=tf.LlavaOnevisionVideoProcessor(**pixels),
            tokenizer=tokenizer,
            num_image_tokens=(35 // 7) ** 2,
            vision_feature_select_strategy=config["vision_feature_select_strategy"],
            vision_aspect_ratio=config.get("vision_aspect_ratio", "anyres_max_9"),
            chat_template=tokenizer.chat_template,
        )
        processor.save_pretrained(out)

    return TinyConfig(
        "LlavaOnevisionForConditionalGeneration",
        build=build,
        make_model=make_model,
        write_extra=write_processor,
        tokens=ONEVISION_TOKENS,
        chat_template=ONEVISION_TEMPLATE,
    )


TINY_CONFIGS["llava_onevision"] = _tiny_onevision()


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}[IMG]"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "[/INST]{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "image_token": "[IMG]",
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
    "inst_token": "[INST]",
    "inst_end_token": "[/INST]",
}
# Pixtral-like tiny tower: 7 px patches, at most 56 px a side
TINY_PIXTRAL = dict(
    model_type="pixtral",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    head_dim=16,
    image_size=56,
    patch_size=7,
    hidden_act="silu",
)


def _tiny_pixtral(arch: str) -> TinyConfig:
    """Mistral 3 (`mistral3`: 2x2 patch merger) or Pixtral-12B's LLaVA form (`pixtral`) on
    the tiny Mistral text shapes."""
    mistral3 = arch == "mistral3"

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        text = {**kwargs, "model_type": "mistral", "head_dim": 16, "sliding_window": None}
        common = dict(
            text_config=text,
            vision_config=TINY_PIXTRAL,
            image_token_index=ids["[IMG]"],
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        if mistral3:
            return tf.Mistral3Config(**common, spatial_merge_size=2)
        return tf.LlavaConfig(**common, vision_feature_select_strategy="full")

    def make_model(hf_config, dtype):
        import transformers as tf

        return tf.AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)

    def write_processor(out, tokenizer) -> None:
        import transformers as tf

        images = tf.PixtralImageProcessor(
            size={"longest_edge": 56}, patch_size={"height": 7, "width": 7}
        )
        processor = tf.PixtralProcessor(
            image_processor=images,
            tokenizer=tokenizer,
            patch_size=7,
            spatial_merge_size=2 if mistral3 else 1,
            chat_template=tokenizer.chat_template,
        )
        processor.save_pretrained(out)

    name = "Mistral3ForConditionalGeneration" if mistral3 else "LlavaForConditionalGeneration"
    return TinyConfig(
        name,
        build=build,
        make_model=make_model,
        write_extra=write_processor,
        tokens=MISTRAL_TOKENS,
        chat_template=MISTRAL_TEMPLATE,
    )


TINY_CONFIGS.update({arch: _tiny_pixtral(arch) for arch in ("mistral3", "pixtral")})
