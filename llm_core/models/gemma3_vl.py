"""Gemma 3 with vision (`Gemma3ForConditionalGeneration`: the 4B / 12B / 27B checkpoints): the
Gemma 3 text decoder (`gemma3.py`) fed by the encoder its registry row names (SigLIP +
average-pool projector, `encoders/gemma3.py`; this file imports no encoder).

Each image's soft tokens attend to each other both ways (one run per pan-and-scan crop), in
the global layers and inside the window in the local ones (transformers: full = causal OR same
run; sliding = window AND (causal OR same run)): `bidirectional_media`, so the scheduler keeps
an image in one step and the runner passes the runs to the attention as key ranges.
"""

from __future__ import annotations

import torch

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.gemma3 import TINY_CONFIGS as TEXT_TINY
from polymodal.llm_core.models.gemma3 import Gemma3ForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig

_TOWER = "vision.vision_tower."
_PROJECTOR = "vision.multi_modal_projector."


class Gemma3ForConditionalGeneration(SupportsMultiModal, Gemma3ForCausalLM):
    """Gemma 3 decoder + image encoder; `encode(items)` gives each image's soft-token rows."""

    bidirectional_media = True
    embeddable = True  # `runner="pooling"`: images and text pooled (decoder_embedding.py)
    # transformers v5 names (`model.language_model.`), the hub's v4 names
    # (`language_model.model.`), and the tower with or without its `vision_model.` level
    weight_name_remap = [
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.vision_tower.vision_model.", _TOWER),
        ("model.vision_tower.", _TOWER),
        ("vision_tower.vision_model.", _TOWER),
        ("vision_tower.", _TOWER),
        ("model.multi_modal_projector.", _PROJECTOR),
        ("multi_modal_projector.", _PROJECTOR),
    ]
    # SigLIP's pooling head, which Gemma 3 never runs (saved by transformers when the vision
    # config lacks `vision_use_head: false`)
    ignored_weights = (r"vision_tower\.(vision_model\.)?head\.",)

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__(cfg, backend, max_positions)
        # transformers applies `final_logit_softcapping` in Gemma3ForCausalLM only, not here
        # (the released checkpoints set none)
        self.final_softcap = None
        device = self.lm_head.weight.device
        self.vision = tower.from_config(cfg.hf_config, cfg.dtype, device, backend)
        image_token = getattr(cfg.hf_config, "image_token_id", None)
        # an image token outside the vocabulary embeds as token 0 (its row is replaced anyway)
        self.clamp_ids = image_token is not None and image_token >= cfg.vocab_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.clamp_ids:
            input_ids = torch.where(input_ids < self.config.vocab_size, input_ids, 0)
        return self.model.embed(input_ids)

    def encode(self, items: list) -> list[torch.Tensor]:
        """Each image's (and crop's) `mm_tokens_per_image` rows, concatenated per item."""
        self.stage(items)
        return self.vision.encode(items)

    def enable_cuda_graphs(self, wrap) -> None:
        """Replay the tower + projector per crop count (fixed 896 px crops: a handful of
        shapes; eager, one image's 27 SigLIP layers are bound by their launches)."""
        self.vision.graphs = wrap(self.vision.embed_pixels)


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_TOKENS = {
    "bos_token": "<bos>",
    "eos_token": "<end_of_turn>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "sot_token": "<start_of_turn>",
}


def _tiny_gemma3_vl() -> TinyConfig:
    """The tiny Gemma 3 text decoder (six layers, window 8) with a 28 px SigLIP tower of 7 px
    patches (16 patches) pooled to 4 tokens an image."""

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        text = {**kwargs, **TEXT_TINY["gemma3"].config}
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
            vision_use_head=False,
        )
        return tf.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
            tie_word_embeddings=True,
        )

    def make_model(hf_config, dtype):
        import transformers as tf

        return tf.Gemma3ForConditionalGeneration._from_config(hf_config, dtype=dtype)

    def write_processor(out, tokenizer) -> None:
        import transformers as tf

        processor = tf.Gemma3Processor(
            image_processor=tf.Gemma3ImageProcessor(size={"height": 28, "width": 28}),
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
            image_seq_length=4,
        )
        processor.save_pretrained(out)

    return TinyConfig(
        "Gemma3ForConditionalGeneration",
        build=build,
        make_model=make_model,
        write_extra=write_processor,
        tokens=GEMMA_TOKENS,
        chat_template=GEMMA_TEMPLATE,
    )


TINY_CONFIGS = {"gemma3_vl": _tiny_gemma3_vl()}
