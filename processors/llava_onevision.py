"""LLaVA-OneVision processor (`LlavaOnevisionForConditionalGeneration`): `<image>` and `<video>`.

Mirrors transformers' `LlavaOnevisionProcessor` with its image and video processors, where a
prompt's images are one sample (`batch_num_images`, as `apply_chat_template` passes them):
- A prompt with one image: LLaVA-NeXT's anyres views (the whole image squashed to `size`,
  then the tiles of the best of `image_grid_pinpoints`). Its tokens: the base view's
  `num_image_tokens`, then the unpadded tile map's features with a newline per row, where a
  map of more than `anyres_max_N` tiles' worth (`vision_aspect_ratio`) is resampled to
  `floor(h / r) x floor(w / r)` first, r = sqrt(h * w / (N * side^2)) when r > 1.1.
- A prompt with several images: each one view, padded to a square with the mean colour and
  resized to `size`: `num_image_tokens` + one newline.
- A video: its frames (a frame list as given, or `num_frames` of it spread evenly; a file:
  `num_frames` frames, default 32), each resized to `size`: `ceil(side / 2)^2` tokens a frame
  (the encoder pools each frame's feature map 2x2, bilinear) + one newline after the video.
The "default" feature strategy takes one token off an image's count (transformers' rule).
The encoder gets the geometry in `data["tile_layout"]`.
"""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.processors.chat import MediaRef
from polymodal.processors.hashing import content_hash
from polymodal.processors.llava import LlavaNextProcessor
from polymodal.processors.llava_views import ViewPlan, view_pixel_values
from polymodal.processors.media import media_error
from polymodal.processors.pixels import (
    image_processor_section,
    normalize_frames,
    processor_section,
    read_json,
    resize,
    scaled_mean_std,
    video_processor_section,
)
from polymodal.processors.qwen_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from polymodal.processors.types import MultimodalItem
from polymodal.processors.video import load_video, sample_indices

DEFAULT_VIDEO_FRAMES = 32  # a video file's frames when the request names no `num_frames`
# the image option the prompt sets: how many images it has (one: anyres; several: one view)
IMAGES_IN_PROMPT = "images_in_prompt"
ONEVISION_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def max_tiles_of(aspect: str) -> int:
    """`"anyres_max_9"` -> 9 (the tiles' worth of features an image's map is held to)."""
    match = re.fullmatch(r"anyres_max_(\d+)", aspect)
    if match is None:
        raise ModelLoadError(f"vision_aspect_ratio must be 'anyres_max_<n>', got {aspect!r}")
    return int(match.group(1))


def fit_to_max_tiles(height: int, width: int, side: int, max_tiles: int) -> tuple[int, int]:
    """The size a `height x width` feature map is resampled to so it holds about `max_tiles`
    tiles of `side x side` (transformers' rule: only when it is over by more than 10%)."""
    ratio = math.sqrt(height * width / (max_tiles * side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


class LlavaOnevisionProcessor(LlavaNextProcessor):
    """Prompt + image / video processing for LLaVA-OneVision."""

    MODALITIES = ("image", "video")
    MEDIA_OPTIONS = ("num_frames",)

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, model_dir=model_dir, **kwargs)
        section = image_processor_section(model_dir) if model_dir is not None else {}
        own = processor_section(model_dir) if model_dir is not None else {}
        if not section.get("image_grid_pinpoints"):  # the image processor's default
            self.pinpoints = [tuple(p) for p in ONEVISION_PINPOINTS]
        self.max_tiles = max_tiles_of(own.get("vision_aspect_ratio") or "anyres_max_9")
        self.num_image_tokens = int(own.get("num_image_tokens") or self._tower_tokens(model_dir))
        self.feature_side = math.isqrt(self.num_image_tokens)  # features per view side
        self.pooled_side = math.ceil(self.feature_side / 2)  # per video frame side
        video = video_processor_section(model_dir) if model_dir is not None else {}
        size = video.get("size") or {"height": self.view[0], "width": self.view[1]}
        self.video_size = (int(size["height"]), int(size["width"]))
        self.video_resample = int(video.get("resample", 3))
        self.video_mean, self.video_std = scaled_mean_std(
            video.get("image_mean", OPENAI_CLIP_MEAN),
            video.get("image_std", OPENAI_CLIP_STD),
            video.get("rescale_factor", 1 / 255),
        )
        self.video_placeholder = getattr(tokenizer, "video_token", None) or own.get(
            "video_token", "<video>"
        )
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_placeholder)

    @staticmethod
    def _tower_tokens(model_dir) -> int:
        """Features per view from config.json's vision tower (processors that omit the count)."""
        config = (read_json(Path(model_dir) / "config.json") or {}) if model_dir else {}
        vision = config.get("vision_config") or {}
        return (vision.get("image_size", 384) // vision.get("patch_size", 14)) ** 2

    def tokens_per_view(self, height: int, width: int) -> int:
        return self.num_image_tokens - 1 if self.drop_cls else self.num_image_tokens

    def tile_layout(self, size: tuple[int, int], rows: int, cols: int) -> list[int]:
        """LLaVA-NeXT's layout, its unpadded map resampled to at most `max_tiles` tiles' worth."""
        layout = super().tile_layout(size, rows, cols)
        height, width = layout[3], layout[5]
        return [*layout[:6], *fit_to_max_tiles(height, width, self.feature_side, self.max_tiles)]

    def image_options(self, refs: list[MediaRef]) -> dict[str, Any]:
        return {IMAGES_IN_PROMPT: sum(ref.modality == "image" for ref in refs)}

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        if options.get(IMAGES_IN_PROMPT, 1) == 1:
            return super().image_item(image, options, pixels_key)
        # one of several: a single view, squared with the mean colour (no tiles)
        plan = ViewPlan(self.view, self.resample, square=tuple(self.pad_colour))
        num_embeds = self.tokens_per_view(*self.view) + 1  # its features and one newline
        knobs = [0, *self.view, self.resample, *self.pad_colour]
        pixel_fn = partial(view_pixel_values, plan=plan)
        item = self._item(image, pixels_key, pixel_fn, knobs, num_embeds, {})
        return item, self.placeholder * num_embeds

    def video_item(self, source, index: int, options: dict[str, Any]) -> tuple[MultimodalItem, str]:
        count = options.get("num_frames")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise InvalidInputError(f"num_frames must be a positive integer, got {count!r}")
        if count is not None and count <= 0:
            raise InvalidInputError(f"num_frames must be a positive integer, got {count}")
        if isinstance(source, (str, Path, bytes, bytearray, memoryview)):
            count = count or DEFAULT_VIDEO_FRAMES
            video = load_video(
                source,
                index=index,
                num_frames=count,
                temporal_patch_size=1,
                allow_http=self.allow_http,
            )
            frames = video.frames
        else:  # frames given: all of them, or `num_frames` spread as transformers samples
            frames = load_video(source, index=index).frames
            if count is not None:
                try:
                    picks = sample_indices(
                        len(frames), 1.0, num_frames=count, temporal_patch_size=1
                    )
                except ValueError as exc:
                    raise media_error("video", index, source, str(exc)) from None
                frames = frames[picks]
        views = resize(frames, self.video_size, self.video_resample)  # [T, 3, S, S]
        num_embeds = views.shape[0] * self.pooled_side**2 + 1  # + one newline after the video
        knobs = [
            *self.video_size,
            self.video_resample,
            *self.video_mean.tolist(),
            *self.video_std.tolist(),
        ]
        key = {"frames": views, "knobs": torch.tensor(knobs, dtype=torch.float64)}
        data = {"pixel_frames": views, "pixel_mean": self.video_mean, "pixel_std": self.video_std}
        item = MultimodalItem(
            "video", data, -1, num_embeds, content_hash("video", key), pixel_fn=normalize_frames
        )
        return item, self.video_placeholder * num_embeds
