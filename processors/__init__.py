"""Raw media -> tensors, and prompt building (chat template, slot expansion, M-RoPE positions).

Entry point: `QwenVLProcessor.from_pretrained(model_dir).process(messages=... | prompt=...)`
returns a `ProcessedPrompt` (token ids, M-RoPE positions, `MultimodalItem`s with slot ranges
and content hashes).
"""

from polymodal.processors.audio import Audio, load_audio
from polymodal.processors.audio_features import Phi4MMFeatures, WhisperFeatures, audio_content_hash
from polymodal.processors.hashing import content_hash
from polymodal.processors.media import load_image
from polymodal.processors.mrope import MediaSpan, mrope_positions
from polymodal.processors.qwen_config import QwenVLCheckpointConfig, load_qwen_vl_config
from polymodal.processors.qwen_vision import (
    VisionPreprocessConfig,
    frames_to_pixel_values,
    normalize_patches,
    plan_patches,
    preprocess_frames,
    smart_resize,
)
from polymodal.processors.qwen_vl import QwenVLProcessor
from polymodal.processors.types import MultimodalItem, ProcessedPrompt
from polymodal.processors.video import VideoFrames, load_video, sample_indices

__all__ = [
    "Audio",
    "Phi4MMFeatures",
    "WhisperFeatures",
    "audio_content_hash",
    "load_audio",
    "MediaSpan",
    "MultimodalItem",
    "ProcessedPrompt",
    "QwenVLCheckpointConfig",
    "QwenVLProcessor",
    "VideoFrames",
    "VisionPreprocessConfig",
    "content_hash",
    "load_image",
    "load_qwen_vl_config",
    "load_video",
    "mrope_positions",
    "frames_to_pixel_values",
    "normalize_patches",
    "plan_patches",
    "preprocess_frames",
    "sample_indices",
    "smart_resize",
]
