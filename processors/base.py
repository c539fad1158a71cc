"""The processor contract every multimodal family implements, and a base for the families whose
placeholders expand in the prompt text (everything but Qwen-VL, which expands token ids).

`MultimodalProcessor` (what `LLM`, the server and the jobs call):
- `from_pretrained(model_dir, **kwargs)`: tokenizer, chat template, the HF processor configs;
- `process(messages=... | prompt=..., images=..., template=..., **options) -> ProcessedPrompt`:
  load media (bounded, errors naming the item), resize / normalize as the HF processor does
  (the float work deferred to the device, `MultimodalItem.pixel_fn`), expand each
  placeholder, hash each item's content;
- `process_tokens(token_ids, refs, options)`: the same for an already tokenized prompt;
- `MEDIA_OPTIONS`: the per-request options it understands (`mm_processor_kwargs`).
Staging on the device is the item's (`MultimodalItem.stage`, called by the model's `stage` on
a worker thread).

`MediaProcessor` does the shared part for text-expanding families: a family supplies its
placeholder text, the token whose positions take embeddings, and `image_item()` (one image ->
an item without a span and its expansion text); a family that takes video also its video
placeholder, token and `video_item()`. Like transformers' processors it replaces each
placeholder in the rendered text (the n-th image placeholder by the n-th image, the n-th video
placeholder by the n-th video) and tokenizes the whole string once, so token ids match the
reference's exactly; each item then owns, in order, the next `num_embeds` positions of its
modality's embed token, its span running from the first to the last (`embed_mask` marks them
inside).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.llm_core.loader import load_tokenizer
from polymodal.processors.chat import ChatTemplateOptions, MediaRef, split_messages
from polymodal.processors.hashing import views_image
from polymodal.processors.image_embeds import embeds_item, given_rows
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
from polymodal.processors.pixels import image_frames_in_place
from polymodal.processors.token_runs import RunEncoder
from polymodal.processors.types import MultimodalItem, ProcessedPrompt


@dataclasses.dataclass
class _Cached:
    """A processed image and its prompt expansion, as the processed-input cache keeps them
    (`data` is the item's: what the cache sizes and copies)."""

    item: MultimodalItem
    expansion: str

    @property
    def data(self) -> dict[str, torch.Tensor]:
        return self.item.data

    def copy(self) -> _Cached:
        return _Cached(copy_item(self.item), self.expansion)


def refuse_modalities(processor: Any, refs: Sequence[MediaRef]) -> None:
    """Raise `InvalidInputError` for the first item of a modality `processor` does not take
    (its `MODALITIES`): an audio part given to an image model is never silently dropped."""
    takes = getattr(processor, "MODALITIES", ("image",))
    for index, ref in enumerate(refs):
        if ref.modality not in takes:
            raise InvalidInputError(
                f"item {index + 1} is {ref.modality}: {type(processor).__name__} takes "
                f"{' and '.join(takes)} input only"
            )


@runtime_checkable
class MultimodalProcessor(Protocol):
    """What the SDK needs from a model's processor (see the module docstring)."""

    tokenizer: Any
    MEDIA_OPTIONS: ClassVar[tuple[str, ...]]
    MODALITIES: ClassVar[tuple[str, ...]]  # "image", "video", "audio"

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> MultimodalProcessor: ...

    def process(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        **options: Any,
    ) -> ProcessedPrompt: ...

    def process_tokens(
        self, token_ids: list[int], refs: list[MediaRef], defaults: dict[str, Any] | None = None
    ) -> ProcessedPrompt: ...


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


class MediaProcessor:
    """Base of the image processors that expand placeholders in the prompt text.

    Subclasses set `placeholder` (the text a prompt marks an image with; chat templates render
    it), `embed_token_id` (the token whose positions take the image's embeddings) and
    implement `image_item(image, options)`; a family with "video" in `MODALITIES` sets
    `video_placeholder` and `video_token_id` too and implements `video_item(...)`.
    """

    MEDIA_OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: the media kinds the model takes (its encoders': an audio part to a model without an
    #: audio encoder is refused, naming the model)
    MODALITIES: ClassVar[tuple[str, ...]] = ("image",)
    placeholder: str = "<image>"
    embed_token_id: int = -1
    video_placeholder: str = "<video>"
    video_token_id: int = -1

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        allow_http: bool = False,
        processed_cache_mb: float = DEFAULT_MAX_MB,
    ) -> None:
        """`max_image_pixels` bounds decoded sizes; `processed_cache_mb` the processed-input
        cache (0: off; `input_cache.py`)."""
        hold_images_in_one_block()  # fresh images read in place (`hashing.pixel_view`)
        self.tokenizer = tokenizer
        self.max_image_pixels = max_image_pixels
        self.allow_http = allow_http
        self.input_cache = ProcessedInputCache(processed_cache_mb) if processed_cache_mb else None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any):
        """Tokenizer and processor configs of the checkpoint in `model_dir`."""
        model_dir = Path(model_dir)
        return cls(load_tokenizer(model_dir), model_dir=model_dir, **kwargs)

    # ---- what a family provides --------------------------------------------------------
    def image_item(
        self, image, options: dict[str, Any], pixels_key: str | None = None
    ) -> tuple[MultimodalItem, str]:
        """One decoded RGB image -> (item without its span, its expansion text). `pixels_key`:
        the image's `hashing.image_key` where it is the caller's own, already hashed
        (`pixels.decoded_pixels`)."""
        raise NotImplementedError

    def video_item(self, source, index: int, options: dict[str, Any]) -> tuple[MultimodalItem, str]:
        """One video (a file, bytes, or a list of frames; `index`: 0-based among the prompt's
        videos, for errors) -> (item without its span, its expansion text)."""
        raise NotImplementedError

    def embeds_expansion(self, num_rows: int) -> str | None:
        """The expansion text of an image given as `num_rows` rows of its projected tower
        output (image_embeds.py); None: the family takes none."""
        return None

    def placeholders(self) -> dict[str, str]:
        """Modality -> the text marking one item of it in a prompt (images, and videos for a
        family that takes them)."""
        marks = {"image": self.placeholder}
        if "video" in self.MODALITIES:
            marks["video"] = self.video_placeholder
        return marks

    def embed_token_ids(self) -> dict[str, int]:
        """Modality -> the token whose positions take its items' embeddings."""
        ids = {"image": self.embed_token_id}
        if "video" in self.MODALITIES:
            ids["video"] = self.video_token_id
        return ids

    # ---- the shared flow ---------------------------------------------------------------
    def render_chat(
        self, messages: list[dict[str, Any]], template: ChatTemplateOptions | None = None
    ) -> str:
        """Apply the chat template to messages from `split_messages`."""
        return (template or ChatTemplateOptions()).render(self.tokenizer, messages)

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Request-level options: those this family knows, others refused by name."""
        unknown = sorted(
            k for k, v in options.items() if v is not None and k not in self.MEDIA_OPTIONS
        )
        if unknown:
            raise InvalidInputError(
                f"media option(s) {unknown} do not apply to {type(self).__name__}; it takes "
                f"{list(self.MEDIA_OPTIONS) or 'none'}"
            )
        return {k: v for k, v in options.items() if v is not None}

    def process(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        *,
        template: ChatTemplateOptions | None = None,
        **options: Any,
    ) -> ProcessedPrompt:
        """One prompt from chat `messages` or a raw `prompt` whose images are marked with the
        family's placeholder, in the order of `images`."""
        if (messages is None) == (prompt is None):
            raise InvalidInputError("pass exactly one of messages= or prompt=")
        options = self.check_options(options)
        if messages is not None:
            if images or videos:
                raise InvalidInputError(
                    "with messages=, give media as message parts, not images=/videos="
                )
            template_messages, refs = split_messages(messages)
            text = self.render_chat(template_messages, template)
            # the template writes the special tokens (BOS) itself, unless asked
            special = (template or ChatTemplateOptions()).add_special_tokens
        else:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
            refs = [MediaRef("image", src) for src in images]
            refs += [MediaRef("video", src) for src in videos]
            text, special = prompt, True  # as the HF processor tokenizes a raw prompt
        marks = self.placeholders()
        found = {modality: text.count(mark) for modality, mark in marks.items()}
        items, expansions = self._items(refs, options, found)
        queues = self._queues(items, expansions)
        modality_of = {mark: modality for modality, mark in marks.items()}
        pattern = "|".join(re.escape(m) for m in sorted(modality_of, key=len, reverse=True))
        # each placeholder -> the next expansion of its modality (a function: taken literally)
        expanded = re.sub(pattern, lambda m: next(queues[modality_of[m.group(0)]]), text)
        ids = self.run_encoder.encode(expanded, add_special_tokens=special)
        return self.finish(ids, items)

    def process_tokens(
        self, token_ids: list[int], refs: list[MediaRef], defaults: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """Expand the placeholder tokens of tokenized `token_ids` with the media `refs`."""
        options = self.check_options(dict(defaults or {}))
        modality_of: dict[int, str] = {}
        for modality, mark in self.placeholders().items():
            marker = self.tokenizer.encode(mark, add_special_tokens=False)
            if len(marker) != 1:
                raise InvalidInputError(f"the placeholder {mark!r} is not one token")
            modality_of[marker[0]] = modality
        found = {m: sum(modality_of.get(t) == m for t in token_ids) for m in modality_of.values()}
        items, expansions = self._items(refs, options, found)
        queues = self._queues(items, expansions)
        ids: list[int] = []
        for token in token_ids:
            if token in modality_of:
                text = next(queues[modality_of[token]])
                ids.extend(self.run_encoder.encode(text, add_special_tokens=False))
            else:
                ids.append(token)
        return self.finish(ids, items)

    @cached_property
    def run_encoder(self) -> RunEncoder:
        """The tokenizer's `encode` with runs of the embed tokens collapsed (`token_runs.py`:
        the same ids, an image's run of slot tokens tokenized as one)."""
        return RunEncoder(self.tokenizer, self.embed_token_ids().values())

    @staticmethod
    def _queues(items: list[MultimodalItem], expansions: list[str]) -> dict[str, Any]:
        """Modality -> an iterator over its items' expansions, in order."""
        by_modality: dict[str, list[str]] = {}
        for item, expansion in zip(items, expansions):
            by_modality.setdefault(item.modality, []).append(expansion)
        return {modality: iter(texts) for modality, texts in by_modality.items()}

    def _items(self, refs: list[MediaRef], options: dict[str, Any], found: dict[str, int]):
        """Load and preprocess every item of `refs` (after checking the placeholder count of
        each modality, `found`)."""
        refuse_modalities(self, refs)
        marks = self.placeholders()
        for modality, count in found.items():
            given = [ref for ref in refs if ref.modality == modality]
            if count != len(given):
                extra = ""
                if len(given) > count:
                    source = describe_source(given[count].source)
                    extra = f"; {modality} {count + 1} ({source}) has none"
                raise MediaError(
                    f"{plural(len(given), modality)} given but the prompt has "
                    f"{plural(count, repr(marks[modality]) + ' placeholder')}{extra}"
                )
        jobs = []
        seen = dict.fromkeys(found, 0)  # items of each modality so far
        for ref in refs:
            jobs.append(partial(self._one_item, seen[ref.modality], ref, refs, options))
            seen[ref.modality] += 1
        # every item decoded and preprocessed side by side (item_pool.py)
        done = run_items(jobs)
        return [item for item, _ in done], [expansion for _, expansion in done]

    def _one_item(self, index: int, ref: MediaRef, refs: list[MediaRef], options: dict[str, Any]):
        """One media item of the request -> (item without its span, its expansion text)."""
        # per-part options a family does not take (Qwen's pixel bounds, OpenAI's `detail`) are
        # dropped: a message part may be written for any model
        item_options = {
            **options,
            **{k: v for k, v in ref.options.items() if k in self.MEDIA_OPTIONS},
        }
        if ref.modality == "video":
            return self.video_item(ref.source, index, item_options)
        rows = given_rows(ref.source)
        if rows is not None:  # the image given as its projected tower output
            return embeds_item(self, index, rows)
        item_options.update(self.image_options(refs))
        key = self._cache_key(ref.source, item_options)
        hit = self.input_cache.get(key) if key is not None else None
        if hit is not None:
            if "pixel_frames" not in hit.item.data:  # kept without the caller's pixels (below)
                hit.item.data["pixel_frames"] = image_frames_in_place(ref.source)[0]
            return hit.item, hit.expansion
        image = load_image(
            ref.source, index=index, max_pixels=self.max_image_pixels, allow_http=self.allow_http
        )
        # the caller's own image as loading left it: its key hashed its pixels already
        pixels_key = key[1] if key is not None and image is ref.source else None
        try:
            item, expansion = self.image_item(image, item_options, pixels_key=pixels_key)
        except ValueError as exc:  # the family's own limits (a side resized to nothing, ...)
            if isinstance(exc, MediaError):
                raise
            raise media_error("image", index, ref.source, str(exc)) from None
        if key is not None:
            # a view of the caller's own image is not kept: changed later, it would no longer
            # be what the key hashed (a hit views the image it is asked with, above)
            borrowed = image is ref.source and views_image(item.data.get("pixel_frames"), image)
            kept = copy_item(item, drop=("pixel_frames",)) if borrowed else item
            self.input_cache.put(key, _Cached(kept, expansion))
        return item, expansion

    def image_options(self, refs: list[MediaRef]) -> dict[str, Any]:
        """Options every image of a prompt with these `refs` gets from the prompt itself (none by
        default; LLaVA-OneVision: how many images there are). Part of the cache key."""
        return {}

    def _cache_key(self, source: Any, options: dict[str, Any]) -> tuple | None:
        """The processed-input cache key of an image source with raw bytes (None: not cached)."""
        if getattr(self, "input_cache", None) is None:
            return None
        raw = raw_media_key(source, self.allow_http)
        if raw is None:
            return None
        return ("image", raw, self.max_image_pixels, repr(sorted(options.items())))

    def finish(self, ids: list[int], items: list[MultimodalItem]) -> ProcessedPrompt:
        """Give each item, in order, the next `num_embeds` positions of its modality's embed
        token (`embed_token_ids`; a modality without its own: the image token): its span runs
        from the first to the last, `embed_mask` marks them inside it. Items come back in
        prompt order."""
        token_of = self.embed_token_ids()
        for kind, token_id in token_of.items():
            own_items = [
                i for i in items if token_of.get(i.modality, self.embed_token_id) == token_id
            ]
            positions = [i for i, token in enumerate(ids) if token == token_id]
            need = sum(item.num_embeds for item in own_items)
            if len(positions) != need:
                raise InvalidInputError(
                    f"the prompt has {len(positions)} {kind} slot tokens but its {kind}s need "
                    f"{need}: the text must not contain the {kind} tokens itself"
                )
            used = 0
            for item in own_items:
                own = positions[used : used + item.num_embeds]
                used += item.num_embeds
                item.slot_start, item.num_slots = own[0], own[-1] + 1 - own[0]
                if item.num_slots != len(own):  # other tokens in between (breaks, separators)
                    mask = torch.zeros(item.num_slots, dtype=torch.bool)
                    mask[torch.tensor(own) - own[0]] = True
                    item.embed_mask = mask
        items = sorted(items, key=lambda item: item.slot_start)
        return ProcessedPrompt(list(ids), None, 0, items)
