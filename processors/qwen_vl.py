"""`QwenVLProcessor`: chat messages or a raw prompt + media -> `ProcessedPrompt` for Qwen2(.5)-VL.

Steps: render the chat template (or take the raw prompt), tokenize, check that the number of
`<|image_pad|>` / `<|video_pad|>` placeholders matches the media given, preprocess each item
(`qwen_vision`), expand each placeholder into `t*h*w / merge^2` slot tokens, compute M-RoPE
positions (`mrope`) and a content hash per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError, ModelLoadError
from polymodal.processors.base import refuse_modalities
from polymodal.processors.chat import ChatTemplateOptions, MediaRef, split_messages
from polymodal.processors.hashing import content_hash, image_key
from polymodal.processors.input_cache import (
    DEFAULT_MAX_MB,
    ProcessedInputCache,
    copy_item,
    raw_media_key,
)
from polymodal.processors.item_pool import run_items
from polymodal.processors.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    describe_source,
    hold_images_in_one_block,
    load_image,
    media_error,
)
from polymodal.processors.mrope import MediaSpan, mrope_positions
from polymodal.processors.pixels import image_frames_in_place, resize
from polymodal.processors.prompt_embeds import (
    GivenMedia,
    is_media_embeds,
    media_embeds_item,
    split_media_embeds,
)
from polymodal.processors.qwen_config import QwenVLCheckpointConfig, load_qwen_vl_config
from polymodal.processors.qwen_vision import (
    VisionPreprocessConfig,
    frames_to_pixel_values,
    plan_patches,
    scaled_mean_std,
)
from polymodal.processors.types import MultimodalItem, ProcessedPrompt
from polymodal.processors.video import (
    DEFAULT_MAX_VIDEO_PIXELS,
    frames_key,
    load_video,
)

# sources with raw bytes (a path, a URL, the file's bytes): keyed by `raw_media_key`
RAW_SOURCES = (str, Path, bytes, bytearray, memoryview)


@dataclass
class QwenMediaItem(MultimodalItem):
    """A Qwen-VL image or video: `data["grid_thw"]` int64 `[1, 3]` (temporal, height, width in
    patches) and the decoded frames, resized + patchified + normalized by
    `frames_to_pixel_values` on staging, on the model's device (`data["patch_layout"]`:
    t_patch, patch, merge, repeat); `num_slots = t*h*w / merge^2`."""

    # Seconds covered by one temporal grid step (temporal_patch_size / sampled fps); videos only.
    second_per_grid: float | None = None


def given_media(refs: list[MediaRef], cfg) -> list[MediaRef]:
    """Media refs with each `{"image_embeds", "image_grid_thw"}` / `{"video_embeds",
    "video_grid_thw"}` source (vLLM's embeddings input) split into one `GivenMedia` ref per
    item it holds."""
    out, counts = [], {"image": 0, "video": 0}
    for ref in refs:
        counts[ref.modality] = counts.get(ref.modality, 0) + 1
        if not is_media_embeds(ref.source, ref.modality):
            out.append(ref)
            continue
        where = f"{ref.modality} {counts[ref.modality]}"
        for given in split_media_embeds(ref.source, ref.modality, cfg.image.merge_size, where):
            out.append(MediaRef(ref.modality, given, ref.options))
    return out


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


class QwenVLProcessor:
    """Prompt + media processing for Qwen2-VL and Qwen2.5-VL checkpoints."""

    MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames")
    MODALITIES = ("image", "video")

    def __init__(
        self,
        tokenizer: Any,
        config: QwenVLCheckpointConfig,
        *,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
        allow_http: bool = False,
        processed_cache_mb: float = DEFAULT_MAX_MB,
    ) -> None:
        """`max_image_pixels` / `max_video_pixels` bound decoded sizes (videos: all frames);
        `processed_cache_mb` bounds the processed-input cache (0: off; `input_cache.py`)."""
        hold_images_in_one_block()  # fresh images read in place (`hashing.pixel_view`)
        self.tokenizer = tokenizer
        self.config = config
        self.max_image_pixels = max_image_pixels
        self.max_video_pixels = max_video_pixels
        self.allow_http = allow_http
        self.input_cache = ProcessedInputCache(processed_cache_mb) if processed_cache_mb else None

    def _cached(self, modality: str, source: Any, *options: Any) -> tuple[tuple | None, Any]:
        """(cache key, the cached item or None) for a source with raw bytes; (None, None) for
        one without, or with the cache off."""
        if self.input_cache is None:
            return None, None
        raw = raw_media_key(source, self.allow_http)
        if raw is None:
            return None, None
        limit = self.max_image_pixels if modality == "image" else self.max_video_pixels
        key = (modality, raw, limit, *options)
        return key, self.input_cache.get(key)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> QwenVLProcessor:
        """Load the tokenizer (with its chat template) and processor configs from `model_dir`."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        config = load_qwen_vl_config(model_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
        template_file = model_dir / "chat_template.jinja"
        if getattr(tokenizer, "chat_template", None) is None and template_file.is_file():
            tokenizer.chat_template = template_file.read_text()
        return cls(tokenizer, config, **kwargs)

    def render_chat(
        self, messages: list[dict[str, Any]], template: ChatTemplateOptions | None = None
    ) -> str:
        """Apply the chat template (the checkpoint's unless `template` names one) to messages
        from `split_messages`."""
        return (template or ChatTemplateOptions()).render(self.tokenizer, messages)

    def process(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
        template: ChatTemplateOptions | None = None,
    ) -> ProcessedPrompt:
        """Build one prompt from chat `messages` or a raw `prompt` with `images` / `videos`.

        A raw prompt marks each item with `<|vision_start|><|image_pad|><|vision_end|>` (or
        `<|video_pad|>`), in the order of `images` / `videos`. `min_pixels` / `max_pixels`
        override the checkpoint's resize bounds (images and video frames); `fps` / `num_frames`
        choose how video files are sampled. `template` says how messages are rendered (tools,
        another template, ...). Media errors raise `MediaError` naming the item.
        """
        if (messages is None) == (prompt is None):
            raise InvalidInputError("pass exactly one of messages= or prompt=")
        defaults = {
            "min_pixels": min_pixels,
            "max_pixels": max_pixels,
            "fps": fps,
            "num_frames": num_frames,
        }
        defaults = {key: value for key, value in defaults.items() if value is not None}
        if messages is not None:
            if images or videos:
                raise InvalidInputError(
                    "with messages=, give media as message parts, not images=/videos="
                )
            template_messages, refs = split_messages(messages)
            prompt = self.render_chat(template_messages, template)
            special = (template or ChatTemplateOptions()).add_special_tokens
        else:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
            refs = [MediaRef("image", src) for src in images] + [
                MediaRef("video", src) for src in videos
            ]
            special = False  # as the HF processor tokenizes a Qwen-VL prompt
        token_ids = self.tokenizer.encode(prompt, add_special_tokens=special)
        return self.process_tokens(token_ids, refs, defaults)

    def process_tokens(
        self, token_ids: list[int], refs: list[MediaRef], defaults: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """Expand the placeholders of tokenized `token_ids` with the media `refs` (in order)."""
        refuse_modalities(self, refs)
        cfg = self.config
        images = given_media([ref for ref in refs if ref.modality == "image"], cfg)
        videos = given_media([ref for ref in refs if ref.modality == "video"], cfg)
        for kind, token_id, given in (
            ("image", cfg.image_token_id, images),
            ("video", cfg.video_token_id, videos),
        ):
            found = token_ids.count(token_id)
            if found != len(given):
                extra = ""
                if len(given) > found:  # name the first item left without a placeholder
                    extra = (
                        f"; {kind} {found + 1} ({describe_source(given[found].source)}) has none"
                    )
                raise MediaError(
                    f"{_plural(len(given), kind)} given but the prompt has "
                    f"{_plural(found, kind + ' placeholder')}{extra}"
                )
        # every item decoded, resized and hashed side by side (item_pool.py)
        jobs = [partial(self._image_item, i, ref, defaults or {}) for i, ref in enumerate(images)]
        jobs += [partial(self._video_item, i, ref, defaults or {}) for i, ref in enumerate(videos)]
        done = run_items(jobs)
        processed = {"image": done[: len(images)], "video": done[len(images) :]}
        queues = {kind: iter(items) for kind, items in processed.items()}
        modality_of = {cfg.image_token_id: "image", cfg.video_token_id: "video"}
        merge_area = cfg.image.merge_size**2
        out_ids: list[int] = []
        mm_items: list[MultimodalItem] = []
        spans: list[MediaSpan] = []
        for token in token_ids:
            kind = modality_of.get(token)
            if kind is None:
                out_ids.append(token)
                continue
            item, interval = next(queues[kind])
            grid = tuple(int(v) for v in item.data["grid_thw"][0])
            item.slot_start, item.num_slots = len(out_ids), int(np.prod(grid)) // merge_area
            out_ids.extend([token] * item.num_slots)
            mm_items.append(item)
            spans.append(MediaSpan(item.slot_start, grid, interval))
        positions, delta = mrope_positions(len(out_ids), spans, cfg.image.merge_size)
        return ProcessedPrompt(out_ids, positions, delta, mm_items)

    def _image_item(
        self, index: int, ref: MediaRef, defaults: dict[str, Any]
    ) -> tuple[QwenMediaItem, float]:
        """Load and preprocess one image; returns the item (slots unset) and its time interval."""
        if isinstance(ref.source, GivenMedia):  # the tower's output, given: no pixels
            return media_embeds_item(ref.source, QwenMediaItem), 1.0
        options = {**defaults, **ref.options}
        icfg = self.config.image
        min_pixels = options.get("min_pixels", icfg.min_pixels)
        max_pixels = options.get("max_pixels", icfg.max_pixels)
        cache_key, hit = self._cached("image", ref.source, min_pixels, max_pixels)
        if hit is not None:
            if "pixel_frames" not in hit.data:  # kept without the caller's pixels (below): the
                hit.data["pixel_frames"] = image_frames_in_place(ref.source)[0]  # just hashed
            return hit, 1.0
        image = load_image(
            ref.source, index=index, max_pixels=self.max_image_pixels, allow_http=self.allow_http
        )
        frames, viewed_memory = image_frames_in_place(image)  # [1, 3, H, W] uint8
        pixels = frames[0].permute(1, 2, 0)  # [H, W, 3]
        try:
            plan = plan_patches(frames, icfg, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError as exc:
            raise media_error("image", index, ref.source, str(exc)) from None
        # hashed as decoded: the image's memory in place where Pillow exports it (a PIL source
        # already in RGB: the key `_cached` took), else the decoded pixels (no copy)
        viewed = cache_key[1] if cache_key is not None and image is ref.source else None
        key = _media_key(viewed or image_key(image) or pixels, min_pixels, max_pixels, icfg)
        item = self._item("image", frames, plan, icfg, key)
        if cache_key is not None:
            # a view of the caller's own image is not kept: changed later, it would no longer
            # be what the key hashed (a hit takes the pixels of the image it was asked with)
            borrowed = viewed_memory and image is ref.source
            drop = ("pixel_frames",) if borrowed else ()
            self.input_cache.put(cache_key, copy_item(item, drop=drop))
        return item, 1.0

    def _video_item(
        self, index: int, ref: MediaRef, defaults: dict[str, Any]
    ) -> tuple[QwenMediaItem, float]:
        """Load, sample and preprocess one video; returns the item and its temporal step."""
        cfg, vcfg = self.config, self.config.video
        if isinstance(ref.source, GivenMedia):  # the tower's output, given: no frames
            item = media_embeds_item(ref.source, QwenMediaItem)
            item.second_per_grid = ref.source.second_per_grid
            return item, _time_interval(cfg, ref.source.second_per_grid)
        options = {**defaults, **ref.options}
        fps, num_frames = options.get("fps"), options.get("num_frames")
        min_pixels = options.get("min_pixels", vcfg.min_pixels)
        max_pixels = options.get("max_pixels", vcfg.max_pixels)
        source, raw = ref.source, None
        if self.input_cache is not None and not isinstance(source, RAW_SOURCES):
            # a frame list: keyed by a hash of its pixels, so a hit skips stacking them and
            # hashing the stack (a miss reads the frames twice: ~30 ms of a 64-frame miss)
            try:
                raw = frames_key(source, self.max_video_pixels)
            except ValueError as exc:
                raise media_error("video", index, ref.source, str(exc)) from None
            cache_key = ("video-frames", raw, self.max_video_pixels, fps,
                         num_frames, min_pixels, max_pixels)  # fmt: skip
            hit = self.input_cache.get(cache_key)
        else:
            cache_key, hit = self._cached("video", source, fps, num_frames, min_pixels, max_pixels)
        if hit is not None:
            return hit, _time_interval(cfg, hit.second_per_grid)
        video = load_video(
            source,
            index=index,
            fps=fps,
            num_frames=num_frames,
            temporal_patch_size=vcfg.temporal_patch_size,
            min_frames=cfg.min_frames,
            max_frames=cfg.max_frames,
            max_pixels=self.max_video_pixels,
            allow_http=self.allow_http,
        )
        if cfg.video_total_pixels is not None:
            # qwen-vl-utils' cap: every frame gets an even share of the whole video's budget
            share = cfg.video_total_pixels * vcfg.temporal_patch_size // video.frames.shape[0]
            max_pixels = max(min(max_pixels, share), int(min_pixels * 1.05))
        try:
            plan = plan_patches(video.frames, vcfg, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError as exc:
            raise media_error("video", index, ref.source, str(exc)) from None
        second_per_grid = vcfg.temporal_patch_size / video.sampled_fps
        # hashed as decoded, [T, H, W, C] (a view, no copy: [T, C, H, W] is a permuted view);
        # a frame list hashed for the input cache already: that digest, with how it was read
        # (the frames follow from them), not a second pass over every pixel (64 frames of
        # 720p: ~25 ms on an H100's host)
        if raw is not None:
            read = f"{raw}|{self.max_video_pixels}|{fps}|{num_frames}".encode()
            frames_digest = blake3.blake3(read).hexdigest()
            key = _media_key(frames_digest, min_pixels, max_pixels, vcfg)
        else:
            key = _media_key(video.frames.permute(0, 2, 3, 1), min_pixels, max_pixels, vcfg)
        frames = video.frames
        if frames.dtype != torch.uint8:
            # alpha-blended float32 frames: torch's float kernel differs by device in the last
            # bits, so these (rare) frames are resized here, on the host, as the reference does
            frames = resize(frames, plan[0], vcfg.resample)
        item = self._item("video", frames, plan, vcfg, key)
        item.second_per_grid = second_per_grid
        if cache_key is not None:
            self.input_cache.put(cache_key, item)
        return item, _time_interval(cfg, second_per_grid)

    @staticmethod
    def _item(
        modality: str, frames: torch.Tensor, plan: tuple, cfg: VisionPreprocessConfig, key: dict
    ) -> QwenMediaItem:
        """A `MultimodalItem` with its tensors and content hash; slots are filled in later.

        The item keeps the decoded `frames` as they are and `plan` (`plan_patches`' output):
        resizing, patchifying and normalizing them is the model's `stage()`, on its device (a
        GPU resizes a 1080p frame in well under a millisecond, the host took ~7-21 ms).
        """
        size, layout, grid = plan
        mean, std = scaled_mean_std(cfg)
        data = {
            "pixel_frames": frames,  # as decoded: uint8 [T, C, H, W], any strides
            "pixel_mean": mean,
            "pixel_std": std,
            "patch_layout": torch.tensor(layout, dtype=torch.int64),
            "grid_thw": torch.tensor([grid], dtype=torch.int64),
        }
        pixel_fn = partial(
            frames_to_pixel_values, layout=tuple(layout), size=size, resample=cfg.resample
        )
        return QwenMediaItem(modality, data, -1, 0, content_hash(modality, key), pixel_fn=pixel_fn)


def _time_interval(cfg, second_per_grid: float) -> float:
    """M-RoPE time step of a video's temporal grid step (1.0 for Qwen2-VL)."""
    return 1.0 if cfg.tokens_per_second is None else second_per_grid * cfg.tokens_per_second


def _media_key(frames: torch.Tensor | str, min_pixels, max_pixels, cfg) -> dict[str, torch.Tensor]:
    """What the content hash covers: the decoded uint8 frames (or a decoded image's
    `image_key`: its pixels hashed in place) and every knob of their preprocessing. Hashing
    these (not the pixel values, 8x larger as float32) keeps the hash cheap; equal keys give
    equal pixel values because preprocessing is deterministic."""
    knobs = [min_pixels, max_pixels, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size]
    knobs += [*cfg.image_mean, *cfg.image_std, cfg.rescale_factor, cfg.resample]
    knobs_tensor = torch.tensor(knobs, dtype=torch.float64)
    if isinstance(frames, str):
        digest = torch.frombuffer(bytearray.fromhex(frames), dtype=torch.uint8)
        return {"image_key": digest, "knobs": knobs_tensor}
    return {"frames": frames, "knobs": knobs_tensor}
