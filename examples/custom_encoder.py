"""Plug a custom vision encoder (and its processor) into polymodal, end to end, offline.

The encoder is deliberately tiny: every 2x2 block of 14x14 patches is flattened and projected
straight into the decoder's hidden size, no transformer. What it shows is the protocol:

1. an encoder class with `from_config`, `load_weights`, `forward(pixel_values, grid_thw)` and
   `spatial_merge_size` (see `polymodal.encoders.registry.VisionEncoder`);
2. `register_encoder(architecture, EncoderClass)`;
3. `register_model(architecture, decoder, processor)` for the checkpoint's architecture name;
4. a checkpoint whose `visual.*` tensors are the encoder's own.

Run: python examples/custom_encoder.py [WORK_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from polymodal import Pipeline
from polymodal.demo_model import write_demo_checkpoint
from polymodal.encoders import register_encoder
from polymodal.llm_core.registry import register_model

ARCH = "PatchProjectorVLForConditionalGeneration"


class PatchProjector(nn.Module):
    """2x2 merged patches -> one decoder embedding each, by a single linear layer."""

    spatial_merge_size = 2
    calls = 0  # how many times the engine ran it (for the demo's printout)

    def __init__(self, patch_dim: int, hidden: int):
        super().__init__()
        self.patch_dim = patch_dim
        self.proj = nn.Linear(4 * patch_dim, hidden)

    @classmethod
    def from_config(cls, vision_config, dtype=torch.float32, device="cpu", backend=None):
        cfg = vision_config
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        return cls(patch_dim, cfg.hidden_size).to(device, dtype)

    def load_weights(self, named_tensors) -> None:
        self.load_state_dict(dict(named_tensors))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        PatchProjector.calls += 1
        # the processor emits each 2x2 merge block's patches as 4 consecutive rows
        return self.proj(pixel_values.reshape(-1, 4 * self.patch_dim))  # [num_slots, hidden]


def make_checkpoint(out: Path) -> Path:
    """A tiny Qwen2-VL checkpoint whose vision weights are replaced by PatchProjector's."""
    write_demo_checkpoint(out, "qwen2_vl")
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = [ARCH]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v for k, v in load_file(out / "model.safetensors").items()
               if not k.startswith("visual.")}  # fmt: skip
    torch.manual_seed(0)
    vision = config["vision_config"]
    patch_dim = vision["in_channels"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    encoder = PatchProjector(patch_dim, vision["hidden_size"])
    tensors.update({f"visual.{k}": v for k, v in encoder.state_dict().items()})
    save_file(tensors, out / "model.safetensors")
    return out


def main(work_dir: str | None = None) -> str:
    register_encoder(ARCH, PatchProjector)
    register_model(
        ARCH,
        decoder="polymodal.llm_core.models.qwen2_vl:Qwen2VLForConditionalGeneration",
        processor="polymodal.processors.qwen_vl:QwenVLProcessor",
    )
    work = Path(work_dir or tempfile.mkdtemp(prefix="custom-encoder-"))
    checkpoint = make_checkpoint(work / "checkpoint")
    pipe = Pipeline(str(checkpoint), device="cpu", dtype="float32")
    pixels = np.random.default_rng(0).integers(0, 256, (112, 140, 3), dtype=np.uint8)
    result = pipe(image=Image.fromarray(pixels), text="What is this?", max_tokens=12)
    print(f"encoder calls: {PatchProjector.calls}; prompt tokens: {result.usage.prompt_tokens}")
    print(f"output (random weights, gibberish by design): {result.text!r}")
    return result.text


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
