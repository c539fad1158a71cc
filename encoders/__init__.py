"""Vision/audio towers and projectors: media tensors -> embeddings [n_slots, hidden].

Find an encoder with `get_encoder_class(architecture)` or load one from a checkpoint
directory with `load_encoder(model_dir, dtype, device, backend)`; plug in your own with
`register_encoder(architecture, cls)` (protocol: `VisionEncoder`).
"""

from polymodal.encoders.loading import load_encoder, read_vision_tensors, vision_tensors
from polymodal.encoders.registry import (
    ENCODERS,
    VisionEncoder,
    get_encoder_class,
    register_encoder,
)

__all__ = [
    "ENCODERS",
    "VisionEncoder",
    "get_encoder_class",
    "load_encoder",
    "read_vision_tensors",
    "register_encoder",
    "vision_tensors",
]
