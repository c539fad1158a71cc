"""Qwen2-VL / Qwen2.5-VL: the Llama-family decoder with M-RoPE, plus the vision tower.

The decoder is `LlamaForCausalLM` (Qwen2 flavour: q/k/v bias, 3-section M-RoPE from the
config); the tower class comes from the registry row's encoder (resolved by the loader: this
file imports no encoder) and is loaded from the same checkpoint (`visual.*`, or
`model.visual.*` in transformers-v5 layout).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.interfaces import SupportsMultiModal
from polymodal.llm_core.models.llama import LlamaForCausalLM
from polymodal.llm_core.models.tiny import TinyConfig

# (t, h, w) patch grids of `warm_up_encoder`: 1932 x 1092 px (a 1080p image resized), two
# temporal patches of 1288 x 728 px (720p video frames)
WARM_GRIDS = ((1, 78, 138), (2, 52, 92))


class Qwen2VLForConditionalGeneration(SupportsMultiModal, LlamaForCausalLM):
    """Decoder + vision tower; `encode(items)` turns media items into slot embeddings."""

    weight_name_remap = [("model.language_model.", "model."), ("model.visual.", "visual.")]
    qkv_bias, o_bias = True, False  # Qwen2's text model
    # The decoder splits over the ranks; the tower is replicated on each (rank 0 runs it and
    # broadcasts the step's media embeddings to the others: llm_core/executor.py).
    supports_tensor_parallel = True
    # `runner="pooling"` serves it as a multimodal embedding model (GME, DSE:
    # models/decoder_embedding.py): its checkpoint names root at `model.` / `lm_head.`
    embeddable = True

    def __init__(self, cfg: ModelConfig, backend, max_positions: int, tower: type):
        super().__init__(cfg, backend, max_positions)
        device = self.model.embed_tokens.weight.device  # (a quantized build defers lm_head's)
        self.visual = tower.from_config(cfg.hf_config.vision_config, cfg.dtype, device, backend)
        self.encoder_graphs = None  # an EncoderGraphs wrapper, see enable_cuda_graphs

    def enable_cuda_graphs(self, wrap) -> None:
        """Replay CUDA graphs for small repeated tower calls (the tower must opt in)."""
        if getattr(self.visual, "supports_cuda_graphs", False):
            self.encoder_graphs = wrap(self.visual)

    def stage(self, items: list) -> None:
        """Make items' pixel values on the model's device, in its dtype (idempotent).

        The processor leaves resized uint8 frames (`MultimodalItem.pixel_values`): they are
        copied (pinned + async on CUDA: no wait for the engine's queued work; 4x+ fewer bytes
        than bf16 pixels), then patchified and normalized there, so the host does no copy and
        no float work. Safe to call from a preprocessing thread, so this overlaps the engine's
        work instead of running inside a step (`stage_ahead`: a repeat whose tower output is
        cached is not staged: no upload, no resize).
        """
        device, dtype = self.media_device_dtype()
        move = partial(copy_to, device=device)
        for it in items:
            it.stage(device, dtype, move)

    def split_media(self, items: list, max_rows: int) -> list:
        """Videos longer than `max_rows` slots as pieces of whole temporal patches (a frame pair
        each): the tower attends within each temporal patch alone (`frames_attend_alone`), so
        the pieces' rows are the video's rows. A tower without that promise gets items whole."""
        if not getattr(self.visual, "frames_attend_alone", False):
            return items
        merge_area = self.visual.spatial_merge_size**2
        pieces = []
        for item in items:
            t, h, w = (int(v) for v in item.data["grid_thw"].reshape(3))
            rows = h * w // merge_area  # slots of one temporal patch
            step = max(1, max_rows // rows)  # temporal patches a piece
            has_pixels = "pixel_values" in item.data or "pixel_frames" in item.data
            if t <= step or item.embed_mask is not None or not has_pixels:
                pieces.append(item)
                continue
            pieces.extend(_temporal_piece(item, t0, min(t, t0 + step)) for t0 in range(0, t, step))
        return pieces

    def warm_up_encoder(self, grids=WARM_GRIDS) -> None:
        """The tower (eager: no graph of a dummy layout is captured) on zero pixels of each
        grid: a 1080p image's and two 720p frame pairs' (their full-attention segments take
        the SDPA route, their windows the Triton kernel at token counts not a multiple of 16)."""
        device, dtype = self.media_device_dtype()
        row = self.visual.patch_embed.proj.weight[0].numel()  # C * T * P * P
        for grid in grids:
            t, h, w = grid
            self.visual(
                torch.zeros(t * h * w, row, device=device, dtype=dtype), torch.tensor([grid])
            )

    def encode(self, items: list) -> list[torch.Tensor]:
        """One tower call for all `items` (images and video alike) -> `[num_slots, hidden]` each."""
        self.stage(items)
        pixels = torch.cat([it.data["pixel_values"] for it in items])  # on the device
        grid = torch.cat([it.data["grid_thw"].reshape(-1, 3) for it in items])
        tower = self.encoder_graphs or self.visual
        embeds = tower(pixels, grid)  # grid stays on the host
        return list(embeds.split([it.num_slots for it in items]))


def _temporal_piece(item, first: int, last: int):
    """Temporal patches `[first, last)` of a Qwen-VL item, as an item of their own: its slots
    are theirs (temporal-patch-major, `h * w / merge^2` each), its pixels a view of theirs
    (staged pixel values: `h * w` rows a temporal patch; raw frames: `t_patch` frames of
    `patch_layout`), its content hash the item's with the range."""
    t, h, w = (int(v) for v in item.data["grid_thw"].reshape(3))
    per_slot = item.num_slots // t
    data = dict(item.data)  # one read: a staging thread swaps the dict, never mutates it
    data["grid_thw"] = torch.tensor([[last - first, h, w]], dtype=torch.int64)
    if "pixel_values" in data:
        data["pixel_values"] = data["pixel_values"][first * h * w : last * h * w]
    else:
        t_patch = int(data["patch_layout"][0])
        data["pixel_frames"] = data["pixel_frames"][first * t_patch : last * t_patch]
    return dataclasses.replace(
        item,
        data=data,
        slot_start=item.slot_start + first * per_slot,
        num_slots=(last - first) * per_slot,
        content_hash=f"{item.content_hash}/t{first}:{last}",
    )


def _tiny_vl_config(arch: str):
    """A tiny Qwen2(.5)-VL config: the shared text shapes with 3-section M-RoPE, a small tower,
    and the tokenizer's media token ids."""

    def build(kwargs: dict, ids: dict):
        import transformers as tf

        text_keys = ("vocab_size", "eos_token_id", "bos_token_id", "pad_token_id")
        text_keys += ("tie_word_embeddings",)
        common = {k: kwargs[k] for k in text_keys if k in kwargs}
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        media = dict(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        if arch == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
            cls = tf.Qwen2VLConfig
        else:
            vision = dict(
                depth=4,
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=64,
                num_heads=2,
                window_size=56,
                fullatt_block_indexes=[1, 3],
            )
            cls = tf.Qwen2_5_VLConfig
        vision.update(patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
        text = {**kwargs, "rope_parameters": rope}
        return cls(text_config=text, vision_config=vision, **media, **common)

    def make_model(hf_config, dtype):
        import transformers as tf

        return tf.AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)

    def write_processor(out, tokenizer) -> None:
        """The HF Qwen2(.5)-VL processor (image + video processor, tokenizer, template)."""
        import transformers as tf

        pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
        cls = tf.Qwen2VLProcessor if arch == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        processor = cls(
            image_processor=tf.Qwen2VLImageProcessor(**pixels),
            video_processor=tf.Qwen2VLVideoProcessor(**pixels),
            tokenizer=tokenizer,
            chat_template=tokenizer.chat_template,
        )
        processor.save_pretrained(out)

    name = (
        "Qwen2VLForConditionalGeneration"
        if arch == "qwen2_vl"
        else ("Qwen2_5_VLForConditionalGeneration")
    )
    return TinyConfig(name, build=build, make_model=make_model, write_extra=write_processor)


TINY_CONFIGS = {arch: _tiny_vl_config(arch) for arch in ("qwen2_vl", "qwen2_5_vl")}
