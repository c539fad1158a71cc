"""`VilaProcessor`: prompts with images and videos for VILA 1.5 / NVILA (`LlavaLlamaModel`).

Follows the public code (`llava_arch.generate_content`, `llava/utils/media.py`,
`llava/mm_utils.py`, the image / video encoders' start and end tokens):
- The chat turns' parts are joined into one string per message (an image is `<image>`, a video
  `<vila/video>`, no separators) and stripped, then rendered with the tokenizer's chat template
  (NVILA) or VILA's conversation format (VILA 1.5, `vila_chat.py`) and tokenized whole, with
  the tokenizer's special tokens (`tokenizer(text)`).
- A prompt with exactly one image on a `dynamic_s2` model tiles it (`vila_tiles.s2_tiles`:
  `rows * cols * tokens` embeddings in raster order); on a `dynamic` model it becomes its
  aspect-fitted tiles (+ a thumbnail), each a view of its own, the text's `<image>` repeated
  with a newline per view. Every other image (several a prompt; `resize` / `pad` models) is
  one square view. After each view's embeddings come the image encoder's `end_tokens`
  (default "\\n", tokenized with the special tokens, as `embed_tokens(tokenizer(...))`).
- A video is `num_video_frames` frames (`round(linspace(0, frames - 1, n))`, or every
  `1 / fps` seconds when the config's `fps` > 0), each one square view; NVILA's TSP video
  encoder averages them per `pool_sizes` (t, h, w) and each (pooled) frame's tokens are
  followed by the video encoder's end tokens (and its start / sep tokens, when set).
Each placeholder token becomes its view's slot tokens (the `<image>` id) and the separators'
ids, so token ids equal the reference's token stream with the embeddings spliced in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.llm_core.loader import load_tokenizer
from polymodal.processors.base import MediaProcessor, plural
from polymodal.processors.chat import MediaRef, split_messages
from polymodal.processors.hashing import content_hash
from polymodal.processors.input_cache import copy_item, raw_media_key
from polymodal.processors.media import describe_source, load_image
from polymodal.processors.pixels import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    image_processor_section,
    image_to_frames,
    normalize_frames,
    scaled_mean_std,
)
from polymodal.processors.types import MultimodalItem, ProcessedPrompt
from polymodal.processors.video import DEFAULT_MAX_VIDEO_PIXELS, frames_from_list, load_video
from polymodal.processors.vila_chat import conversation_template
from polymodal.processors.vila_config import VilaMedia, vila_frame_indices
from polymodal.processors.vila_tiles import (
    dynamic_tiles,
    s2_tiles,
    square_view,
    square_views,
    to_frames,
)

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<vila/video>"
MODES = {"single": 0, "s2": 1, "dynamic": 2, "video": 3}  # content-hash knob


@dataclass
class _Media:
    """One loaded image / video: its item (span filled by `finish`) and, per placeholder token
    it takes, the token ids that replace it (`slot` ids where embeddings go)."""

    item: MultimodalItem
    groups: list[list[int]]
    text: str  # what its placeholder becomes in the prompt text (dynamic tiles: one per view)

    @property
    def data(self) -> dict[str, torch.Tensor]:
        """The item's tensors (what the processed-input cache sizes)."""
        return self.item.data

    def copy(self) -> _Media:
        """A copy whose item and groups are its own (tensors shared), as the cache hands out."""
        return _Media(copy_item(self.item), list(self.groups), self.text)


class VilaProcessor(MediaProcessor):
    """Prompt + image / video processing for `LlavaLlamaModel` checkpoints."""

    MEDIA_OPTIONS = ("num_frames", "fps")
    placeholder = IMAGE_TOKEN

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        root = Path(model_dir) if model_dir is not None else None
        self.media = VilaMedia.from_model_dir(root) if root else VilaMedia("resize", 448, 16)
        section = image_processor_section(root / "vision_tower") if root else {}
        mean = section.get("image_mean", IMAGENET_STANDARD_MEAN)
        self.pad_colour = tuple(int(x * 255) for x in mean)
        self.mean, self.std = scaled_mean_std(
            mean,
            section.get("image_std", IMAGENET_STANDARD_STD),
            section.get("rescale_factor", 1 / 255),
        )
        for token in (IMAGE_TOKEN, VIDEO_TOKEN):  # as VILA's tokenizer setup: added if missing
            if token not in tokenizer.get_vocab():
                tokenizer.add_tokens([token], special_tokens=True)
        self.embed_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        start, end = self.media.image_tokens
        self.image_ids = (self._ids(start), self._ids(end))
        start, end, sep = self.media.video_tokens
        self.video_ids = (self._ids(start), self._ids(end), self._ids(sep))
        if getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = conversation_template(str(root or ""))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any):
        """Tokenizer from the root or `llm/` (the hub's layout), media settings from config.json
        and `vision_tower/preprocessor_config.json`."""
        root = Path(model_dir)
        tokenizer_dir = root if (root / "tokenizer_config.json").is_file() else root / "llm"
        return cls(load_tokenizer(tokenizer_dir), model_dir=root, **kwargs)

    def _ids(self, text: str | None) -> list[int]:
        """The ids VILA embeds for a separator: `tokenizer(text)`, special tokens included."""
        return [] if not text else list(self.tokenizer(text).input_ids)

    # ---- prompts ------------------------------------------------------------------------
    def process(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        images=(),
        videos=(),
        *,
        template=None,
        **options: Any,
    ) -> ProcessedPrompt:
        """One prompt from chat `messages` or a raw `prompt` marked with `<image>` /
        `<vila/video>` (images and videos each in order)."""
        if (messages is None) == (prompt is None):
            raise InvalidInputError("pass exactly one of messages= or prompt=")
        options = self.check_options(options)
        if messages is not None:
            if images or videos:
                raise InvalidInputError(
                    "with messages=, give media as message parts, not images=/videos="
                )
            turns, refs = split_messages(messages)
        else:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
            refs = [MediaRef("image", s) for s in images] + [MediaRef("video", s) for s in videos]
        media = self._load(refs, options)
        images_ = iter(m for m in media if m.item.modality == "image")
        if messages is not None:  # parts joined and stripped per message, as VILA's turns
            for turn in turns:
                if isinstance(turn["content"], list):
                    turn["content"] = "".join(self._part(p, images_) for p in turn["content"])
                turn["content"] = turn["content"].strip()
            text = self.render_chat(turns, template)
        else:
            self._count(prompt, IMAGE_TOKEN, refs, "image")
            self._count(prompt, VIDEO_TOKEN, refs, "video")
            pieces = prompt.split(IMAGE_TOKEN)
            text = pieces[0] + "".join(next(images_).text + p for p in pieces[1:])
        return self._expand(self.tokenizer(text).input_ids, media)

    def process_tokens(
        self, token_ids: list[int], refs: list[MediaRef], defaults: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """Expand the `<image>` / `<vila/video>` tokens of tokenized `token_ids` (a `dynamic`
        image's views then follow each other with a newline's ids between)."""
        media = self._load(refs, self.check_options(dict(defaults or {})))
        for m in media:
            if len(m.groups) > 1:  # the text form's "<image>\n" per view, as ids
                newline = self.tokenizer.encode("\n", add_special_tokens=False)
                m.groups = [sum((g + newline for g in m.groups[:-1]), []) + m.groups[-1]]
        return self._expand(list(token_ids), media)

    def _part(self, part: dict, images) -> str:
        """A message part as VILA's turn text: media as their placeholder; media tokens a text
        part writes itself are removed (and that part stripped)."""
        kind = part["type"]
        if kind == "image":
            return next(images).text
        if kind == "video":
            return VIDEO_TOKEN
        text = part["text"]
        if IMAGE_TOKEN in text or VIDEO_TOKEN in text:
            text = text.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").strip()
        return text

    def _count(self, text: str, token: str, refs: list[MediaRef], kind: str) -> None:
        given = sum(ref.modality == kind for ref in refs)
        found = text.count(token)
        if found != given:
            marks = plural(found, repr(token) + " placeholder")
            raise MediaError(f"{plural(given, kind)} given but the prompt has {marks}")

    def _expand(self, ids: list[int], media: list[_Media]) -> ProcessedPrompt:
        """Replace each placeholder token with its media's next group of ids."""
        queues = {
            self.embed_token_id: deque(m for m in media if m.item.modality == "image"),
            self.video_token_id: deque(m for m in media if m.item.modality == "video"),
        }
        out: list[int] = []
        order: list[_Media] = []  # media in the order the stream reaches them
        used: dict[int, int] = {}
        for token in ids:
            queue = queues.get(token)
            if queue is None:
                out.append(token)
                continue
            if not queue:
                name = "image" if token == self.embed_token_id else "video"
                raise MediaError(f"the prompt has more {name} placeholders than {name}s given")
            m = queue[0]
            if id(m) not in used:
                order.append(m)
            used[id(m)] = used.get(id(m), 0) + 1
            out.extend(m.groups[used[id(m)] - 1])
            if used[id(m)] == len(m.groups):
                queue.popleft()
        left = sum(len(q) for q in queues.values())
        if left:
            raise MediaError(
                f"{plural(left, 'media item')} given without a placeholder in the prompt"
            )
        return self.finish(out, [m.item for m in order])

    # ---- media --------------------------------------------------------------------------
    def _load(self, refs: list[MediaRef], options: dict[str, Any]) -> list[_Media]:
        """Load and preprocess every image and video of `refs`, in order."""
        count = sum(ref.modality == "image" for ref in refs)
        out, image_index, video_index = [], 0, 0
        for ref in refs:
            if ref.modality == "image":
                tiled = count == 1  # one image alone is tiled; several: a view each
                key = self._media_key(ref.source, "image", self.max_image_pixels, tiled)
                media = self.input_cache.get(key) if key is not None else None
                if media is None:
                    image = load_image(
                        ref.source,
                        index=image_index,
                        max_pixels=self.max_image_pixels,
                        allow_http=self.allow_http,
                    )
                    media = self._image(image, tiled=tiled)
                    self._keep(key, media)
                image_index += 1
            else:
                item_options = {
                    **options,
                    **{k: v for k, v in ref.options.items() if k in self.MEDIA_OPTIONS},
                }
                num_frames = int(item_options.get("num_frames") or self.media.num_frames)
                fps = item_options.get("fps")
                fps = float(fps if fps is not None else self.media.fps)
                key = self._media_key(ref.source, "video", num_frames, fps)
                media = self.input_cache.get(key) if key is not None else None
                if media is None:
                    media = self._video(ref.source, video_index, num_frames, fps)
                    self._keep(key, media)
                video_index += 1
            out.append(media)
        return out

    def _media_key(self, source: Any, *options: Any) -> tuple | None:
        """The processed-input cache key of a source with raw bytes (a path, bytes, a data:
        URL) and the options that shape its views; None: not cached."""
        if self.input_cache is None:
            return None
        raw = raw_media_key(source, self.allow_http)
        return None if raw is None else (raw, *options)

    def _keep(self, key: tuple | None, media: _Media) -> None:
        if key is not None:
            self.input_cache.put(key, media)

    def _image(self, image, tiled: bool) -> _Media:
        m, size = self.media, self.media.size
        start, end = self.image_ids
        view = start + [self.embed_token_id] * m.tokens_side**2 + end
        extra: dict[str, torch.Tensor] = {}
        if tiled and m.aspect == "dynamic_s2" and m.scales:
            tiles, (rows, cols) = s2_tiles(image, m.scales, m.max_tiles, size)
            extra["block_size"] = torch.tensor([rows, cols])
            groups = [start + [self.embed_token_id] * (rows * cols * m.tokens_side**2) + end]
            mode, text = "s2", IMAGE_TOKEN
        elif tiled and m.aspect == "dynamic":
            tiles = dynamic_tiles(image, m.min_tiles, m.max_tiles, size)
            groups, mode = [view] * len(tiles), "dynamic"
            text = (IMAGE_TOKEN + "\n") * len(tiles)
        else:
            pad = self.pad_colour if m.aspect == "pad" else None
            tiles, groups, mode, text = (
                [square_view(image, size, pad)],
                [view],
                "single",
                IMAGE_TOKEN,
            )
        frames = to_frames(tiles)
        knobs = [
            MODES[mode],
            size,
            m.max_tiles,
            m.min_tiles,
            *m.scales,
            *extra.get("block_size", []),
        ]
        item = self._item("image", image_to_frames(image)[0], frames, knobs, groups, extra)
        return _Media(item, groups, text)

    def _video(self, source, index: int, num_frames: int, fps: float) -> _Media:
        m = self.media
        try:
            if isinstance(source, (str, Path, bytes, bytearray, memoryview)):
                sampler = lambda total, rate: vila_frame_indices(total, rate, num_frames, fps)
                frames = load_video(
                    source, index=index, sampler=sampler, allow_http=self.allow_http
                ).frames
            else:  # given frames: VILA's frame-folder rule (evenly spread, rounded)
                if not hasattr(source, "__len__") or not len(source):
                    raise ValueError("a video must be a file, bytes, or a non-empty frame list")
                picks = vila_frame_indices(len(source), 0.0, num_frames, 0.0)
                chosen = (
                    [source[i] for i in picks]
                    if isinstance(source, (list, tuple))
                    else source[picks]
                )
                frames = frames_from_list(chosen, DEFAULT_MAX_VIDEO_PIXELS)
        except MediaError:  # already names the video (a loader's)
            raise
        except ValueError as exc:
            raise MediaError(f"video {index + 1} ({describe_source(source)}): {exc}") from None
        if frames.dtype != torch.uint8:  # alpha-blended frames: back to whole values
            frames = frames.round().clamp(0, 255).to(torch.uint8)
        hwc = frames.permute(0, 2, 3, 1).contiguous()  # a view back to the decoded layout
        views = square_views([frame.numpy() for frame in hwc], m.size)
        count, ids = len(views), []
        for t, h, w in m.pools or [(1, 1, 1)]:
            if count % t or m.tokens_side % h or m.tokens_side % w:
                raise MediaError(
                    f"video {index + 1}: {count} frames of {m.tokens_side}x{m.tokens_side} "
                    f"tokens do not divide into the pooling {(t, h, w)}; pass num_frames as a "
                    f"multiple of {t}"
                )
            start, end, sep = self.video_ids
            frame = (
                start + [self.embed_token_id] * ((m.tokens_side // h) * (m.tokens_side // w)) + end
            )
            ids += frame * (count // t) + sep  # per pooled frame, then the pool's separator
        knobs = [MODES["video"], m.size, *(v for p in m.pools for v in p)]
        item = self._item("video", frames, views, knobs, [ids], {})
        return _Media(item, [ids], VIDEO_TOKEN)

    def _item(self, modality, source, frames, knobs, groups, extra) -> MultimodalItem:
        """The item of `frames` (the views); its hash covers the decoded `source` or the views,
        whichever is smaller (either fixes what the encoder sees), and the settings."""
        knobs = torch.tensor([*knobs, *self.mean.tolist(), *self.std.tolist()], dtype=torch.float64)
        key = "source" if source.numel() < frames.numel() else "frames"
        digest = content_hash(
            modality, {key: source if key == "source" else frames, "knobs": knobs}
        )
        num_embeds = sum(token == self.embed_token_id for g in groups for token in g)
        data = {"pixel_frames": frames, "pixel_mean": self.mean, "pixel_std": self.std, **extra}
        return MultimodalItem(modality, data, -1, num_embeds, digest, pixel_fn=normalize_frames)
