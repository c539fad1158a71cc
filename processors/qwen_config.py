"""Read what the Qwen2-VL / Qwen2.5-VL processors need from a checkpoint directory.

Two layouts exist in the wild: the original `preprocessor_config.json` (+ optional
`video_preprocessor_config.json`) with top-level `min_pixels` / `max_pixels`, and the
transformers v5 `processor_config.json` holding `image_processor` and `video_processor`
sections whose `size` is `{"shortest_edge": min_pixels, "longest_edge": max_pixels}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polymodal.llm_core.errors import ModelLoadError
from polymodal.processors.qwen_vision import VisionPreprocessConfig

QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class QwenVLCheckpointConfig:
    """Token ids, pixel pipelines and video settings of one Qwen-VL checkpoint."""

    model_type: str
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    image: VisionPreprocessConfig
    video: VisionPreprocessConfig
    tokens_per_second: float | None  # Qwen2.5-VL only: temporal position ids per second
    min_frames: int = 4
    max_frames: int = 768
    # Pixel budget shared by all frames of a video (qwen-vl-utils' cap), None = per-frame only.
    video_total_pixels: int | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _vision_config(
    section: dict[str, Any], fallback: VisionPreprocessConfig
) -> VisionPreprocessConfig:
    """A processor config section -> `VisionPreprocessConfig` (missing keys keep `fallback`'s)."""
    size = section.get("size") or {}
    min_pixels = section.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    max_pixels = section.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    values = dict(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=section.get("patch_size"),
        temporal_patch_size=section.get("temporal_patch_size"),
        merge_size=section.get("merge_size"),
        image_mean=tuple(section["image_mean"]) if "image_mean" in section else None,
        image_std=tuple(section["image_std"]) if "image_std" in section else None,
        rescale_factor=section.get("rescale_factor"),
        resample=section.get("resample"),
    )
    kept = {key: getattr(fallback, key) for key, value in values.items() if value is None}
    return VisionPreprocessConfig(**{**values, **kept})


def load_qwen_vl_config(model_dir: str | Path) -> QwenVLCheckpointConfig:
    """Parse config.json and the processor configs of a Qwen2-VL / Qwen2.5-VL checkpoint."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    if config is None:
        raise ModelLoadError(f"{model_dir} has no config.json")
    model_type = config.get("model_type")
    if model_type not in QWEN_VL_MODEL_TYPES:
        raise ModelLoadError(
            f"{model_dir}: model_type {model_type!r} is not one of {QWEN_VL_MODEL_TYPES}"
        )
    vision = config.get("vision_config", {})
    try:
        token_ids = {
            k: int(config[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id")
        }
    except KeyError as exc:
        raise ModelLoadError(f"{model_dir}/config.json lacks {exc.args[0]}") from None

    combined = _read_json(model_dir / "processor_config.json") or {}
    image_section = (
        _read_json(model_dir / "preprocessor_config.json") or combined.get("image_processor") or {}
    )
    video_section = (
        _read_json(model_dir / "video_preprocessor_config.json")
        or combined.get("video_processor")
        or image_section  # older checkpoints: the video processor reads the image config
    )
    # Defaults when a key is missing: the vision tower's own sizes, then HF's class defaults.
    base = VisionPreprocessConfig(
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        merge_size=vision.get("spatial_merge_size", 2),
    )
    image = _vision_config(image_section, base)
    video = _vision_config(video_section, image)
    total_pixels = None
    if video_section.get("cap_pixels_per_frame"):
        tokens = video_section.get("max_video_tokens", 128000)
        total_pixels = int(tokens * video.factor * video.factor * 0.9)
    # 4 is the transformers config default when the key is absent
    tokens_per_second = vision.get("tokens_per_second", 4) if model_type == "qwen2_5_vl" else None
    return QwenVLCheckpointConfig(
        model_type=model_type,
        **token_ids,
        image=image,
        video=video,
        tokens_per_second=tokens_per_second,
        min_frames=video_section.get("min_frames", 4),
        max_frames=video_section.get("max_frames", 768),
        video_total_pixels=total_pixels,
    )
