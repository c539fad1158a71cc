"""What a VILA / NVILA checkpoint's config.json says about its media (`VilaMedia`): the view
size, the tokens a view gives after the projector, the tiling mode and scales, the video
frames and pooling, the encoders' separator texts; and VILA's frame choice."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polymodal.llm_core.errors import ModelLoadError
from polymodal.processors.pixels import read_json

# k of the projectors' k x k fold (the others keep every feature)
DOWNSAMPLE = {
    "mlp_downsample": 2,
    "mlp_downsample_2x2_fix": 2,
    "mlp_downsample_3x3_fix": 3,
    "mlp_downsample_3x3_s2": 3,
    "mlp_downsample_3x3_s2_new": 3,
}


def _encoder_spec(value) -> dict:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def _sub_config(root: Path, raw: dict, key: str, folder: str) -> dict:
    value = raw.get(key)
    if isinstance(value, dict) and value:
        return value
    return read_json(root / folder / "config.json") or {}


@dataclass
class VilaMedia:
    """How a checkpoint turns media into views and tokens (from its config.json)."""

    aspect: str  # image_aspect_ratio: resize / pad / dynamic / dynamic_s2 / (other: resize)
    size: int  # the square view's side in pixels
    tokens_side: int  # tokens per view side after the projector
    scales: list[int] = field(default_factory=list)  # dynamic S2 scales (px)
    min_tiles: int = 1
    max_tiles: int = 12
    num_frames: int = 8
    fps: float = 0.0
    pools: list[tuple[int, int, int]] = field(default_factory=list)
    image_tokens: tuple = (None, "\n")  # (start, end) text around each image view
    video_tokens: tuple = (None, "\n", None)  # (start, end, sep) of the video encoder

    @classmethod
    def from_model_dir(cls, root: Path) -> VilaMedia:
        raw = read_json(root / "config.json") or {}
        vision = _sub_config(root, raw, "vision_tower_cfg", "vision_tower")
        projector = _sub_config(root, raw, "mm_projector_cfg", "mm_projector")
        if raw.get("s2") and not raw.get("dynamic_s2"):
            raise ModelLoadError(f"{root}: VILA's fixed S2 (`s2: true`) is not supported")
        if int(raw.get("video_max_tiles") or 1) > 1:
            raise ModelLoadError(
                f"{root}: tiled video frames (`video_max_tiles` > 1) are not supported"
            )
        scales = raw.get("s2_scales") or []
        scales = sorted(
            int(s)
            for s in (scales.split(",") if isinstance(scales, str) else scales)
            if str(s).strip()
        )
        dynamic_s2 = bool(raw.get("dynamic_s2"))
        size = scales[0] if dynamic_s2 else int(vision.get("image_size", 448))
        side = size // int(vision.get("patch_size", 14))
        k = DOWNSAMPLE.get(projector.get("mm_projector_type", ""), 1)
        image, video = (
            _encoder_spec(raw.get("image_encoder")),
            _encoder_spec(raw.get("video_encoder")),
        )
        pools = (
            video.get("pool_sizes") if video.get("_target_", "").endswith("TSPVideoEncoder") else []
        )
        return cls(
            aspect=raw.get("image_aspect_ratio") or "resize",
            size=size,
            tokens_side=-(-side // k),
            scales=scales if dynamic_s2 else [],
            min_tiles=int(raw.get("min_tiles") or 1),
            max_tiles=int(raw.get("max_tiles") or 12),
            num_frames=int(raw.get("num_video_frames") or 8),
            fps=float(raw.get("fps") or 0.0),
            pools=[tuple(p) for p in pools or []],
            image_tokens=(image.get("start_tokens"), image.get("end_tokens", "\n")),
            video_tokens=(
                video.get("start_tokens"),
                video.get("end_tokens", "\n"),
                video.get("sep_tokens"),
            ),
        )


def vila_frame_indices(total: int, video_fps: float, num_frames: int, fps: float) -> list[int]:
    """VILA's frame choice: every `1 / fps` seconds (at most `num_frames`) when `fps` > 0, else
    `num_frames` evenly spread (rounded, so a short video repeats frames)."""
    if fps > 0 and video_fps > 0:
        times = np.arange(0, total / video_fps, 1.0 / fps)[:num_frames]
        return [int(t * video_fps) for t in times]
    return np.round(np.linspace(0, total - 1, num_frames)).astype(int).tolist()
