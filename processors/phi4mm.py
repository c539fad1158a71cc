"""`Phi4MMProcessor`: prompts with images and audio for Phi-4-multimodal.

Mirrors transformers' `Phi4MultimodalProcessor` (+ `Phi4MultimodalImageProcessorFast`,
`Phi4MultimodalFeatureExtractor`) and the hub's remote processor:

- placeholders: `<|image_N|>` / `<|audio_N|>` (the hub's numbered form; N is not read, items
  are taken in order of appearance, as the hub processor does) and transformers' `<|image|>` /
  `<|audio|>`; each becomes the image (audio) token repeated once per embedding;
- images: dynamic HD (`dynamic_hd` crops at most): the image is resized (bilinear, antialiased,
  aspect kept) into a grid of `crop` x `crop` crops, padded white, normalized (mean = std =
  0.5); a global view (bicubic, no antialias, from the normalized pixels) comes first. The
  patch mask marks the padding; an image takes `g^2 + g + 1 + valid + valid_rows` tokens
  (`g` = pooled tokens per crop side: the global view with a separator per row, one separator,
  the valid pooled sub-crop tokens with a separator per row);
- audio: Phi-4-MM log-mel features (`audio_features.Phi4MMFeatures`), `ceil(frames / 8)`
  tokens a clip.

The pixel and feature work runs here, on the host (float32); items carry `pixel_values`,
`patch_mask`, `image_size` or `audio_features`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.llm_core.loader import load_tokenizer
from polymodal.processors.audio import load_audio
from polymodal.processors.audio_features import Phi4MMFeatures, audio_content_hash
from polymodal.processors.base import plural
from polymodal.processors.chat import ChatTemplateOptions, MediaRef, split_messages
from polymodal.processors.hashing import content_hash
from polymodal.processors.input_cache import DEFAULT_MAX_MB, ProcessedInputCache, raw_media_key
from polymodal.processors.media import DEFAULT_MAX_IMAGE_PIXELS, load_image
from polymodal.processors.pixels import (
    image_processor_section,
    image_to_frames,
    read_json,
    split_tiles,
)
from polymodal.processors.types import MultimodalItem, ProcessedPrompt

IMAGE_PATTERN = re.compile(r"<\|image(?:_\d+)?\|>")
AUDIO_PATTERN = re.compile(r"<\|audio(?:_\d+)?\|>")
# the hub tokenizer's names of the slot tokens (transformers' renames them <|image|>, <|audio|>)
HUB_IMAGE_TOKEN, HUB_AUDIO_TOKEN = "<|endoftext10|>", "<|endoftext11|>"


def closest_aspect_ratio(aspect: float, ratios, width: int, height: int, size: int):
    """transformers' `find_closest_aspect_ratio` (ties go to the larger grid when the image
    covers more than half of it)."""
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def hd_grid(width: int, height: int, size: int, max_crops: int) -> tuple[int, int]:
    """(crops across, crops down) of an image: its ceil'd grid, or the closest aspect ratio of
    at most `max_crops` crops."""
    cols, rows = math.ceil(width / size), math.ceil(height / size)
    if cols * rows <= max_crops:
        return cols, rows
    ratios = {(i, j) for n in range(1, max_crops + 1) for i in range(1, n + 1)
              for j in range(1, n + 1) if i * j <= max_crops}  # fmt: skip
    ratios = sorted(ratios, key=lambda r: r[0] * r[1])
    return closest_aspect_ratio(width / height, ratios, width, height, size)


def dynamic_hd(frames: torch.Tensor, size: int, patch: int, max_crops: int):
    """uint8 `[3, H, W]` -> (resized + white-padded uint8 `[3, rows*size, cols*size]`, patch
    mask `[rows*m, cols*m]` with m = size // patch)."""
    from torchvision.transforms.v2 import functional as tvF

    height, width = frames.shape[-2:]
    cols, rows = hd_grid(width, height, size, max_crops)
    target_w, target_h = size * cols, size * rows
    if target_w / width < target_h / height:
        new_w, new_h = target_w, int(height * (target_w / width))
    else:
        new_w, new_h = int(width * (target_h / height)), target_h
    pad_w, pad_h = target_w - new_w, target_h - new_h
    m = size // patch
    mask = torch.ones(m * rows, m * cols)
    if pad_w >= patch:
        mask[:, -math.floor(pad_w / patch) :] = 0
    if pad_h >= patch:
        mask[-math.floor(pad_h / patch) :, :] = 0
    if min(new_h, target_h) < 10 or min(new_w, target_w) < 10:
        raise ValueError(f"the aspect ratio is too extreme (resized to {new_w}x{new_h})")
    resized = tvF.resize(frames, [new_h, new_w])  # bilinear, antialiased
    return tvF.pad(resized, [0, 0, pad_w, pad_h], fill=[255, 255, 255]), mask


def image_tokens(mask: torch.Tensor, size: int, patch: int) -> int:
    """Embeddings of an image whose padded-grid patch mask is `mask` `[rows*m, cols*m]`."""
    m = size // patch
    g = (m + 1) // 2  # pooled tokens per crop side (2x2 average pooling, odd sides padded)
    pooled = mask[0::2, 0::2]  # one per pooled token of the sub-crop grid
    rows = int(pooled[:, 0].sum())  # valid pooled rows: each ends with a separator
    return g * g + g + 1 + int(pooled.sum()) + rows


class Phi4MMProcessor:
    """Prompt, image and audio processing for Phi-4-multimodal checkpoints (both layouts)."""

    MEDIA_OPTIONS: ClassVar[tuple[str, ...]] = ("dynamic_hd",)
    MODALITIES: ClassVar[tuple[str, ...]] = ("image", "audio")

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, allow_http: bool = False,
                 processed_cache_mb: float = DEFAULT_MAX_MB, **_: Any) -> None:  # fmt: skip
        """`processed_cache_mb` bounds the processed-input cache (0: off; `input_cache.py`):
        images and clips given as bytes, paths or data: URLs are processed once."""
        self.tokenizer = tokenizer
        self.max_image_pixels, self.allow_http = max_image_pixels, allow_http
        self.input_cache = ProcessedInputCache(processed_cache_mb) if processed_cache_mb else None
        section = image_processor_section(model_dir) if model_dir is not None else {}
        size = section.get("size") or {"height": 448, "width": 448}
        self.crop = int(size.get("height", 448))
        self.patch = int(section.get("patch_size", 14))
        self.max_crops = int(section.get("dynamic_hd", 36))
        self.mean = [float(v) for v in section.get("image_mean", [0.5] * 3)]
        self.std = [float(v) for v in section.get("image_std", [0.5] * 3)]
        self.rescale = float(section.get("rescale_factor", 1 / 255))
        audio = _audio_section(model_dir)
        self.features = Phi4MMFeatures.from_config(audio)
        self.image_token = getattr(tokenizer, "image_token", None) or HUB_IMAGE_TOKEN
        self.audio_token = getattr(tokenizer, "audio_token", None) or HUB_AUDIO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.audio_token_id = tokenizer.convert_tokens_to_ids(self.audio_token)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> Phi4MMProcessor:
        """Tokenizer and processor configs of the checkpoint in `model_dir`."""
        model_dir = Path(model_dir)
        return cls(load_tokenizer(model_dir), model_dir=model_dir, **kwargs)

    # ---- items ----------------------------------------------------------------------------
    def image_item(self, image, index: int, max_crops: int) -> MultimodalItem:
        """One RGB image -> its crops' pixel values (global view first) and patch masks."""
        from torchvision.transforms.v2 import functional as tvF

        frames = image_to_frames(image)[0]  # [3, H, W] uint8
        try:
            padded, mask = dynamic_hd(frames, self.crop, self.patch, max_crops)
        except ValueError as exc:
            raise MediaError(f"image {index + 1}: {exc}") from None
        mean = torch.tensor(self.mean) / self.rescale
        std = torch.tensor(self.std) / self.rescale
        pixels = tvF.normalize(padded.to(torch.float32), mean.tolist(), std.tolist())
        size = self.crop
        glob = tvF.resize(pixels, [size, size], interpolation=tvF.InterpolationMode.BICUBIC,
                          antialias=False)  # fmt: skip
        height, width = pixels.shape[-2:]
        rows, cols = height // size, width // size
        crops = split_tiles(pixels, rows, cols, size)  # row-major crops
        m = size // self.patch
        crop_masks = mask.reshape(rows, m, cols, m).transpose(1, 2).reshape(-1, m, m)
        data = {
            "pixel_values": torch.cat([glob[None], crops]),  # [1 + crops, 3, S, S]
            "patch_mask": torch.cat([torch.ones(1, m, m), crop_masks]).bool(),
            "image_size": torch.tensor([height, width]),
        }
        key = {"frames": frames, "knobs": torch.tensor([size, self.patch, max_crops,
               *self.mean, *self.std], dtype=torch.float64)}  # fmt: skip
        num = image_tokens(mask, size, self.patch)
        return MultimodalItem("image", data, -1, num, content_hash("image", key))

    def audio_item(self, source, index: int) -> MultimodalItem:
        """One clip -> its log-mel features `[frames, 80]`."""
        clip = load_audio(source, index=index, sampling_rate=self.features.sampling_rate,
                          allow_http=self.allow_http, cache=self.input_cache)  # fmt: skip
        try:
            features = self.features(clip.waveform)
        except ValueError as exc:
            raise MediaError(f"audio {index + 1}: {exc}") from None
        num = self.features.num_embeds(clip.waveform.shape[-1])
        digest = audio_content_hash(clip.waveform, self.features)
        return MultimodalItem("audio", {"audio_features": features}, -1, num, digest)

    # ---- prompts --------------------------------------------------------------------------
    def process(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        audios: Sequence[Any] = (),
        *,
        template: ChatTemplateOptions | None = None,
        **options: Any,
    ) -> ProcessedPrompt:
        """One prompt from chat `messages` or a raw `prompt` marked with `<|image_N|>` /
        `<|audio_N|>` (or `<|image|>` / `<|audio|>`), media in order of `images` / `audios`."""
        if (messages is None) == (prompt is None):
            raise InvalidInputError("pass exactly one of messages= or prompt=")
        options = self._options(options)
        if messages is not None:
            if images or videos or audios:
                raise InvalidInputError("with messages=, give media as message parts")
            template_messages, refs = split_messages(messages)
            text = (template or ChatTemplateOptions()).render(self.tokenizer, template_messages)
        else:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
            refs = [MediaRef("image", s) for s in images] + [MediaRef("video", s) for s in videos]
            refs += [MediaRef("audio", s) for s in audios]
            text = prompt
        items = self._items(refs, options, len(IMAGE_PATTERN.findall(text)),
                            len(AUDIO_PATTERN.findall(text)))  # fmt: skip
        images_iter = iter([it for it in items if it.modality == "image"])
        audio_iter = iter([it for it in items if it.modality == "audio"])
        text = IMAGE_PATTERN.sub(lambda _: self.image_token * next(images_iter).num_slots, text)
        text = AUDIO_PATTERN.sub(lambda _: self.audio_token * next(audio_iter).num_slots, text)
        special = messages is None or (template or ChatTemplateOptions()).add_special_tokens
        ids = self.tokenizer.encode(text, add_special_tokens=special)
        return self.finish(ids, items)

    def process_tokens(self, token_ids: list[int], refs: list[MediaRef],
                       defaults: dict[str, Any] | None = None) -> ProcessedPrompt:  # fmt: skip
        """Expand the image / audio tokens of tokenized `token_ids` (one per item)."""
        options = self._options(dict(defaults or {}))
        found = {t: token_ids.count(t) for t in (self.image_token_id, self.audio_token_id)}
        items = self._items(refs, options, found[self.image_token_id],
                            found[self.audio_token_id])  # fmt: skip
        queues = {"image": iter(i for i in items if i.modality == "image"),
                  "audio": iter(i for i in items if i.modality == "audio")}  # fmt: skip
        kinds = {self.image_token_id: "image", self.audio_token_id: "audio"}
        ids: list[int] = []
        for token in token_ids:
            kind = kinds.get(token)
            ids.extend([token] * (next(queues[kind]).num_slots if kind else 1))
        return self.finish(ids, items)

    def _options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(k for k, v in options.items() if v is not None
                         and k not in self.MEDIA_OPTIONS)  # fmt: skip
        if unknown:
            raise InvalidInputError(
                f"media option(s) {unknown} do not apply to Phi4MMProcessor; it takes "
                f"{list(self.MEDIA_OPTIONS)}"
            )
        return {k: v for k, v in options.items() if v is not None}

    def _items(self, refs: list[MediaRef], options: dict, images: int, audios: int):
        if any(ref.modality == "video" for ref in refs):
            raise InvalidInputError("Phi-4-multimodal takes images and audio, not videos")
        for kind, found in (("image", images), ("audio", audios)):
            given = sum(ref.modality == kind for ref in refs)
            if given != found:
                raise MediaError(
                    f"{plural(given, kind)} given but the prompt has "
                    f"{plural(found, kind + ' placeholder')} (<|{kind}_N|>)"
                )
        max_crops = int(options.get("dynamic_hd", self.max_crops))
        items, counts = [], {"image": 0, "audio": 0}
        for ref in refs:
            index = counts[ref.modality]
            counts[ref.modality] += 1
            if ref.modality == "image":
                items.append(self._cached_image(ref.source, index, max_crops))
            else:
                items.append(self.audio_item(ref.source, index))
        if counts["image"]:  # audio next to an image goes through the vision-speech projector
            for item in items:
                if item.modality == "audio":
                    item.data["vision_speech"] = torch.tensor(True)
                    item.content_hash += ":vision_speech"
        return items

    def _cached_image(self, source: Any, index: int, max_crops: int) -> MultimodalItem:
        """`image_item` of `source`, from the processed-input cache when its bytes were
        processed before with the same crop limit (and pixel limit)."""
        raw = raw_media_key(source, self.allow_http) if self.input_cache is not None else None
        key = ("image", raw, self.max_image_pixels, max_crops)
        if raw is not None and (hit := self.input_cache.get(key)) is not None:
            return hit
        image = load_image(source, index=index, max_pixels=self.max_image_pixels,
                           allow_http=self.allow_http)  # fmt: skip
        item = self.image_item(image, index, max_crops)
        if raw is not None:
            self.input_cache.put(key, item)
        return item

    def finish(self, ids: list[int], items: list[MultimodalItem]) -> ProcessedPrompt:
        """Give each item, in order, the next `num_slots` slot tokens of its modality."""
        for kind, token in (("image", self.image_token_id), ("audio", self.audio_token_id)):
            own = [it for it in items if it.modality == kind]
            positions = [i for i, t in enumerate(ids) if t == token]
            need = sum(it.num_slots for it in own)
            if len(positions) != need:
                raise InvalidInputError(
                    f"the prompt has {len(positions)} {kind} slot tokens but its {kind}s need "
                    f"{need}: the text must not contain the slot tokens itself"
                )
            used = 0
            for item in own:  # an item's slots are consecutive tokens
                item.slot_start = positions[used]
                used += item.num_slots
        return ProcessedPrompt(list(ids), None, 0, items)


def _audio_section(model_dir) -> dict[str, Any]:
    """The feature extractor's settings: preprocessor_config.json's `audio_processor` section
    (transformers' processor save) or its top level."""
    if model_dir is None:
        return {}
    model_dir = Path(model_dir)
    for name in ("processor_config.json", "preprocessor_config.json"):
        raw = read_json(model_dir / name) or {}
        section = raw.get("audio_processor") or raw.get("feature_extractor")
        if section:
            return section
    return read_json(model_dir / "preprocessor_config.json") or {}
