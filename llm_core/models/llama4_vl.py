"""Llama 4 with vision (`Llama4ForConditionalGeneration`: Scout, Maverick): the Llama 4 text
decoder (`llama4.py`) whose `<|patch|>` slots are filled by the encoder its registry row names
(tiles through the ViT, pixel shuffle, MLP and projector: `encoders/llama4.py`; this file
imports no encoder).

An image's tokens attend causally, as in transformers (its Llama 4 builds plain causal and
chunked causal masks, with no image groups): the scheduler may split an image across steps.
Tile separators, `<|image|>` before the global view and the start/end tokens keep their token
embeddings (`MultimodalItem.embed_mask`).
"""

from __future__ import annotations

import torch

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.llama4 import TINY_CONFIGS as TEXT_TINY
from polymodal.llm_core.models.llama4 import Llama4ForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig

_VISION = "vision."


class Llama4ForConditionalGeneration(SupportsMultiModal, Llama4ForCausalLM):
    """Llama 4 decoder + image encoder; `encode(items)` gives each image's patch rows."""

    # the hub's layout (`language_model.model.`, `vision_model.`, `multi_modal_projector.`)
    # onto the decoder's `model.` and the encoder's `vision.`
    weight_name_remap = [
        *Llama4ForCausalLM.weight_name_remap,
        ("model.vision_model.", _VISION + "vision_model."),
        ("vision_model.", _VISION + "vision_model."),
        ("model.multi_modal_projector.", _VISION + "multi_modal_projector."),
        ("multi_modal_projector.", _VISION + "multi_modal_projector."),
    ]

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__(cfg, backend, max_positions)
        device = self.lm_head.weight.device
        self.vision = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)

    def encode(self, items: list) -> list[torch.Tensor]:
        """Each image's tiles (and global view) -> `tokens_per_tile` rows each, in order."""
        self.stage(items)
        return self.vision.encode(items)

    def enable_cuda_graphs(self, wrap) -> None:
        """Replay the tower + projector per tile count (fixed 336 px tiles: at most 17 shapes;
        eager, one image's 34 tower layers were bound by their launches: 44% of the GPU idle)."""
        self.vision.graphs = wrap(self.vision.embed_tiles)


LLAMA4_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot|>",
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "image_token": "<|image|>",
    "patch_token": "<|patch|>",
    "tile_x": "<|tile_x_separator|>",
    "tile_y": "<|tile_y_separator|>",
    "header_start": "<|header_start|>",
    "header_end": "<|header_end|>",
}
# the user/assistant turns of Llama 4's template (no tools, no system-message extraction)
LLAMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|header_start|>{{ message['role'] }}"
    "<|header_end|>\n\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant"
    "<|header_end|>\n\n{% endif %}"
)
# a 28 px tile of 7 px patches: 16 patches + the class token, pixel-shuffled to 4 tokens
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=128,  # hidden / ratio^2: the pixel-shuffled width the adapter takes
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=28,
    patch_size=7,
    vision_output_dim=64,
    projector_input_dim=64,
    projector_output_dim=64,
    pixel_shuffle_ratio=0.5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _tiny_llama4_vl() -> TinyConfig:
    """The tiny Llama 4 text decoder with a 28 px tile tower; images of up to 4 tiles
    (+ the global view)."""

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        return tf.Llama4Config(
            text_config={**kwargs, **TEXT_TINY["llama4"].config},
            vision_config=TINY_VISION,
            boi_token_index=ids["<|image_start|>"],
            eoi_token_index=ids["<|image_end|>"],
            image_token_index=ids["<|patch|>"],
            tie_word_embeddings=False,
        )

    def make_model(hf_config, dtype):
        import transformers as tf

        return tf.Llama4ForConditionalGeneration._from_config(hf_config, dtype=dtype)

    def write_processor(out, tokenizer) -> None:
        import transformers as tf

        processor = tf.Llama4Processor(
            image_processor=tf.Llama4ImageProcessor(
                size={"height": 28, "width": 28}, max_patches=4
            ),
            tokenizer=tokenizer,
            patch_size=7,
            pixel_shuffle_ratio=0.5,
            chat_template=tokenizer.chat_template,
        )
        processor.save_pretrained(out)

    return TinyConfig(
        "Llama4ForConditionalGeneration",
        build=build,
        make_model=make_model,
        write_extra=write_processor,
        tokens=LLAMA4_TOKENS,
        chat_template=LLAMA4_TEMPLATE,
    )


TINY_CONFIGS = {"llama4_vl": _tiny_llama4_vl()}
