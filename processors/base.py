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
an item without a span and its expansion text). Like transformers' processors it replaces
each placeholder in the rendered text and tokenizes the whole string once, so token ids match
the reference's exactly; each item then owns, in order, the next `num_embeds` positions of
the embed token, its span running from the first to the last (`embed_mask` marks them inside).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError, ModelLoadError
from polymodal.processors.chat import ChatTemplateOptions, MediaRef, split_messages
from polymodal.processors.input_cache import (
    DEFAULT_MAX_MB,
    ProcessedInputCache,
    copy_item,
    raw_media_key,
)
from polymodal.processors.item_pool import run_items
from polymodal.processors.media import DEFAULT_MAX_IMAGE_PIXELS, describe_source, load_image
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


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, with `chat_template.jinja` as its template when it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir}: {exc}") from None
    template_file = model_dir / "chat_template.jinja"
    if getattr(tokenizer, "chat_template", None) is None and template_file.is_file():
        tokenizer.chat_template = template_file.read_text()
    return tokenizer


class MediaProcessor:
    """Base of the image processors that expand placeholders in the prompt text.

    Subclasses set `placeholder` (the text a prompt marks an image with; chat templates render
    it), `embed_token_id` (the token whose positions take the image's embeddings) and
    implement `image_item(index, image, options)`.
    """

    MEDIA_OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: the media kinds the model takes (its encoders': an audio part to a model without an
    #: audio encoder is refused, naming the model)
    MODALITIES: ClassVar[tuple[str, ...]] = ("image",)
    placeholder: str = "<image>"
    embed_token_id: int = -1

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
    def image_item(self, image, options: dict[str, Any]) -> tuple[MultimodalItem, str]:
        """One decoded RGB image -> (item without its span, its expansion text)."""
        raise NotImplementedError

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
            special = False  # the template writes the special tokens (BOS) itself
        else:
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
            refs = [MediaRef("image", src) for src in images]
            refs += [MediaRef("video", src) for src in videos]
            text, special = prompt, True  # as the HF processor tokenizes a raw prompt
        items, expansions = self._items(refs, options, text.count(self.placeholder))
        pieces = text.split(self.placeholder)
        expanded = pieces[0] + "".join(e + p for e, p in zip(expansions, pieces[1:]))
        ids = self.tokenizer.encode(expanded, add_special_tokens=special)
        return self.finish(ids, items)

    def process_tokens(
        self, token_ids: list[int], refs: list[MediaRef], defaults: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """Expand the placeholder tokens of tokenized `token_ids` with the media `refs`."""
        options = self.check_options(dict(defaults or {}))
        marker = self.tokenizer.encode(self.placeholder, add_special_tokens=False)
        if len(marker) != 1:
            raise InvalidInputError(f"the placeholder {self.placeholder!r} is not one token")
        found = token_ids.count(marker[0])
        items, expansions = self._items(refs, options, found)
        queue = iter(expansions)
        ids: list[int] = []
        for token in token_ids:
            if token == marker[0]:
                ids.extend(self.tokenizer.encode(next(queue), add_special_tokens=False))
            else:
                ids.append(token)
        return self.finish(ids, items)

    def _items(self, refs: list[MediaRef], options: dict[str, Any], found: int):
        """Load and preprocess every image of `refs` (after checking the placeholder count)."""
        refuse_modalities(self, refs)
        if found != len(refs):
            extra = ""
            if len(refs) > found:
                extra = f"; image {found + 1} ({describe_source(refs[found].source)}) has none"
            raise MediaError(
                f"{plural(len(refs), 'image')} given but the prompt has "
                f"{plural(found, repr(self.placeholder) + ' placeholder')}{extra}"
            )
        # every image decoded and preprocessed side by side (item_pool.py)
        done = run_items([partial(self._one_image, i, ref, options) for i, ref in enumerate(refs)])
        return [item for item, _ in done], [expansion for _, expansion in done]

    def _one_image(self, index: int, ref: MediaRef, options: dict[str, Any]):
        """One image of the request -> (item without its span, its expansion text)."""
        # per-part options a family does not take (Qwen's pixel bounds, OpenAI's `detail`) are
        # dropped: a message part may be written for any model
        item_options = {
            **options,
            **{k: v for k, v in ref.options.items() if k in self.MEDIA_OPTIONS},
        }
        key = self._cache_key(ref.source, item_options)
        hit = self.input_cache.get(key) if key is not None else None
        if hit is not None:
            return hit.item, hit.expansion
        image = load_image(
            ref.source, index=index, max_pixels=self.max_image_pixels, allow_http=self.allow_http
        )
        item, expansion = self.image_item(image, item_options)
        if key is not None:
            self.input_cache.put(key, _Cached(item, expansion))
        return item, expansion

    def _cache_key(self, source: Any, options: dict[str, Any]) -> tuple | None:
        """The processed-input cache key of an image source with raw bytes (None: not cached)."""
        if getattr(self, "input_cache", None) is None:
            return None
        raw = raw_media_key(source, self.allow_http)
        if raw is None:
            return None
        return ("image", raw, self.max_image_pixels, repr(sorted(options.items())))

    def finish(self, ids: list[int], items: list[MultimodalItem]) -> ProcessedPrompt:
        """Give each item, in order, the next `num_embeds` positions of the embed token: its
        span runs from the first to the last, `embed_mask` marks them inside it."""
        positions = [i for i, token in enumerate(ids) if token == self.embed_token_id]
        need = sum(item.num_embeds for item in items)
        if len(positions) != need:
            raise InvalidInputError(
                f"the prompt has {len(positions)} image slot tokens but its images need {need}: "
                "the text must not contain the image tokens itself"
            )
        used = 0
        for item in items:
            own = positions[used : used + item.num_embeds]
            used += item.num_embeds
            item.slot_start, item.num_slots = own[0], own[-1] + 1 - own[0]
            if item.num_slots != len(own):  # other tokens in between (breaks, separators)
                mask = torch.zeros(item.num_slots, dtype=torch.bool)
                mask[torch.tensor(own) - own[0]] = True
                item.embed_mask = mask
        return ProcessedPrompt(list(ids), None, 0, items)
