"""`Gemma3Processor`: prompts with images for `Gemma3ForConditionalGeneration`.

Mirrors transformers' `Gemma3Processor` + `Gemma3ImageProcessor` (torchvision backend): each
`<start_of_image>` in the text becomes `"\\n\\n<start_of_image>" + <image_soft_token> x
image_seq_length + "<end_of_image>\\n\\n"`; the image is resized to the tower's square size
(bilinear, antialiased; no aspect kept) and normalized (mean = std = 0.5), at staging on the
model's device (`llava_views.crops_pixel_values`; the processor keeps the decoded image).
With pan-and-scan (`do_pan_and_scan=True`, off by default as in transformers) an image whose
aspect ratio reaches `pan_and_scan_min_ratio_to_activate` is also cut into
2..`pan_and_scan_max_num_crops` crops along its long side (each at least
`pan_and_scan_min_crop_size` pixels), every crop resized the same way, and the text says so:
"Here is the original image <image> and here are some crops to help you see better <crop> <crop>".
An image's soft tokens form one bidirectional run per crop.
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from polymodal.llm_core.errors import MediaError, ModelLoadError
from polymodal.processors.base import MediaProcessor
from polymodal.processors.hashing import content_hash
from polymodal.processors.llava_views import CropsPlan, crops_pixel_values
from polymodal.processors.pixels import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    decoded_pixels,
    image_processor_section,
    processor_section,
    scaled_mean_std,
)
from polymodal.processors.types import MultimodalItem

# transformers' `Gemma3ProcessorKwargs._defaults` (they override the image processor config)
PAN_AND_SCAN_DEFAULTS = {
    "do_pan_and_scan": False,
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}


def pan_and_scan_boxes(
    height: int, width: int, min_crop_size: int, max_num_crops: int, min_ratio: float
) -> list[tuple[int, int, int, int]]:
    """Crop boxes (top, left, height, width) of transformers' `pan_and_scan_batched`; [] when
    the image is not elongated enough or the crops would be too small."""
    if width >= height:
        if width / height < min_ratio:
            return []
        num_w = int(math.floor(width / height + 0.5))
        num_w = min(int(math.floor(width / min_crop_size)), num_w)
        num_w = min(max_num_crops, max(2, num_w))
        num_h = 1
    else:
        if height / width < min_ratio:
            return []
        num_h = int(math.floor(height / width + 0.5))
        num_h = min(int(math.floor(height / min_crop_size)), num_h)
        num_h = min(max_num_crops, max(2, num_h))
        num_w = 1
    crop_w, crop_h = int(math.ceil(width / num_w)), int(math.ceil(height / num_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    tops, lefts = [crop_h * i for i in range(num_h)], [crop_w * i for i in range(num_w)]
    return [(top, left, crop_h, crop_w) for top, left in itertools.product(tops, lefts)]


class Gemma3Processor(MediaProcessor):
    """Prompt + image processing for Gemma 3 (4B / 12B / 27B) checkpoints."""

    MEDIA_OPTIONS = tuple(PAN_AND_SCAN_DEFAULTS)

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        section = image_processor_section(model_dir) if model_dir is not None else {}
        size = section.get("size") or {"height": 896, "width": 896}
        self.size = (int(size["height"]), int(size["width"]))
        self.resample = int(section.get("resample", 2))
        self.mean, self.std = scaled_mean_std(
            section.get("image_mean", IMAGENET_STANDARD_MEAN),
            section.get("image_std", IMAGENET_STANDARD_STD),
            section.get("rescale_factor", 1 / 255),
        )
        own = processor_section(model_dir) if model_dir is not None else {}
        self.image_seq_length = int(own.get("image_seq_length", 256))
        boi, eoi, image = (
            getattr(tokenizer, name, None) for name in ("boi_token", "eoi_token", "image_token")
        )
        if None in (boi, eoi, image):
            raise ModelLoadError(
                "the Gemma 3 tokenizer lacks boi_token / eoi_token / image_token (its "
                "tokenizer_config.json's extra special tokens)"
            )
        self.placeholder = boi
        self.embed_token_id = tokenizer.convert_tokens_to_ids(image)
        self.full_image = f"\n\n{boi}{image * self.image_seq_length}{eoi}\n\n"

    def embeds_expansion(self, num_rows: int) -> str:
        """An image given as its projected rows, one view's (`image_seq_length`, 256): between
        the begin / end-of-image tokens, as an image without pan-and-scan crops."""
        if num_rows != self.image_seq_length:
            raise MediaError(
                f"Gemma 3 image embeddings are one view's {self.image_seq_length} rows, got "
                f"{num_rows} (pan-and-scan crops: give the image itself)"
            )
        return self.full_image

    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        """The image (and its crops) resized to the tower's size, and the expansion text."""
        opts = {**PAN_AND_SCAN_DEFAULTS, **options}
        frames, pixels = decoded_pixels(image, pixels_key)  # [1, 3, H, W] uint8
        boxes = []
        if opts["do_pan_and_scan"]:
            boxes = pan_and_scan_boxes(
                image.height,
                image.width,
                int(opts["pan_and_scan_min_crop_size"]),
                int(opts["pan_and_scan_max_num_crops"]),
                float(opts["pan_and_scan_min_ratio_to_activate"]),
            )
        # the crops are resized at staging, on the model's device (`llava_views`)
        plan = CropsPlan(self.size, self.resample, tuple(tuple(box) for box in boxes))
        knobs = [*self.size, self.resample, *self.mean.tolist(), *self.std.tolist()]
        knobs += [float(bool(opts["do_pan_and_scan"]))] + [float(b) for box in boxes for b in box]
        knobs = torch.tensor(knobs, dtype=torch.float64)
        key = {**pixels, "knobs": knobs}
        data = {"pixel_frames": frames, "pixel_mean": self.mean, "pixel_std": self.std}
        num_embeds = (1 + len(boxes)) * self.image_seq_length
        pixel_fn = partial(crops_pixel_values, plan=plan)
        item = MultimodalItem(
            "image", data, -1, num_embeds, content_hash("image", key), pixel_fn=pixel_fn
        )
        if not boxes:
            return item, self.full_image
        expansion = (
            f"Here is the original image {self.full_image} and here are some crops to help you "
            "see better " + " ".join([self.full_image] * len(boxes))
        )
        return item, expansion
