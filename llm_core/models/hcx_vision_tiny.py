"""Tiny random HyperCLOVA X SEED Vision checkpoints in the hub's layout (one folder:
`language_model.*`, `vision_model.vision_model.*`, `mm_projector.*`, `image_newline`, a
config.json with `language_config` / `vision_config`, preprocessor_config.json), for the demo
and the tests.

The chat template is a stand-in: the hub's own could not be read. It renders an image part as
the turns the published prompt uses (TensorRT-LLM's HCX placeholder: a `(mime)` turn, a
`(vector)` turn holding `<|dummy3|>`, an `image/aux` turn; the aux text shortened here) and
other turns as ChatML; a checkpoint's real template is what the processor renders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from polymodal.llm_core.models.tiny import TinyConfig

IMAGE_TOKEN, VIDEO_TOKEN, END_OF_TURN = "<|dummy3|>", "<|_unuse_missing_100270|>", "<|endofturn|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}"
    "{{ '<|im_start|>' + message['role'] + ' (mime) \\n"
    '{"type": "image/jpeg", "filename": ""}'
    "<|im_end|>\\n<|im_start|>' + message['role'] + ' (vector)\\n<|dummy3|><|im_end|>\\n"
    '<|im_start|>image/aux\\n{"ocr": "", "lens_keywords": "", "lens_local_keywords": ""}'
    "<|im_end|>\\n' }}"
    "{% elif part['type'] == 'text' %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + part['text'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# a SigLIP-like tiny tower: 28 px grids of 7 px patches (4 x 4 tokens)
TINY_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=28,
    patch_size=7,
)
# demo name -> (config.json media fields, preprocessor_config.json fields)
VARIANTS = {
    # as the published model: anyres with unpad + newlines, 3 x 3 queries a grid (an adaptive
    # pool of 4 x 4 tokens: overlapping windows), the tower's second-to-last layer
    "hcx_vision": (
        dict(
            anyres=True,
            unpad=True,
            max_num_grids=4,
            num_queries_vis_abstractor_image=9,
            use_nth_layer=-2,
        ),
        dict(pad_to_square=True),
    ),  # fmt: skip
    # the other published switches: no unpad, 2 x 2 queries, the last layer, the prenorm, the
    # 1 x 1 grid, the global view squashed instead of padded, no position embedding
    "hcx_vision_plain": (
        dict(
            anyres=True,
            unpad=False,
            max_num_grids=3,
            num_queries_vis_abstractor_image=4,
            use_nth_layer=-1,
            proj_prenorm=True,
            proj_pos_emb=False,
            use_1x1_grid=True,
        ),
        dict(pad_to_square=False),
    ),  # fmt: skip
}


class HCXCheckpoint(nn.Module):
    """The parts of a HyperCLOVA X SEED Vision checkpoint under the hub's names."""

    def __init__(self, config, dtype) -> None:
        super().__init__()
        import transformers as tf

        from polymodal.llm_core.registry import encoder_class

        self.config = config
        hidden = config.text_config.hidden_size
        self.language_model = tf.AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
        self.vision_model = tf.SiglipVisionModel._from_config(config.vision_config, dtype=dtype)
        # the C-Abstractor as the encoder builds it (randomly initialized), through the
        # registry: llm_core never imports the encoders package
        self.mm_projector = encoder_class("HCXVisionForCausalLM")(config).mm_projector
        self.image_newline = nn.Parameter(torch.randn(hidden))
        self.to(dtype)

    def save_pretrained(self, out) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"image_newline": self.image_newline.detach()}
        for prefix, part in (
            ("language_model.", self.language_model),
            # the hub's tower was saved by transformers 4.x: names under `vision_model.`
            ("vision_model.vision_model.", self.vision_model),
            ("mm_projector.", self.mm_projector),
        ):
            tensors.update({prefix + k: v for k, v in part.state_dict().items()})
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))


def _tiny(name: str) -> TinyConfig:
    fields, preprocessor = VARIANTS[name]

    def build(kwargs: dict, ids: dict):
        from polymodal.llm_core.models.hcx_vision import HCXVisionConfig

        text = {**kwargs, "model_type": "llama", "head_dim": 16, "tie_word_embeddings": False}
        return HCXVisionConfig(
            architectures=["HCXVisionForCausalLM"],
            language_config=text,
            vision_config=TINY_SIGLIP,
            mm_projector_type="cabstractor",
            image_token_id=ids[IMAGE_TOKEN],
            video_token_id=ids[VIDEO_TOKEN],
            eos_token_id=ids[END_OF_TURN],
            **fields,
        )

    def write_preprocessor(out, tokenizer) -> None:
        side = TINY_SIGLIP["image_size"]
        config = dict(
            crop_size={"height": side, "width": side},
            size={"shortest_edge": side},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            resample=3,
            **preprocessor,
        )
        (Path(out) / "preprocessor_config.json").write_text(json.dumps(config, indent=2))

    return TinyConfig(
        "HCXVisionForCausalLM",
        build=build,
        make_model=lambda config, dtype: HCXCheckpoint(config, dtype or torch.float32),
        write_extra=write_preprocessor,
        tokens={"eos_token": END_OF_TURN, "image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        chat_template=CHAT_TEMPLATE,
    )


TINY_CONFIGS = {name: _tiny(name) for name in VARIANTS}
