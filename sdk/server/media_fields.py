"""A chat request's media options: vLLM's `mm_processor_kwargs` and `media_io_kwargs` (the
video loader's `num_frames` / `fps`) as one set of options for its messages' media (a mixin
of `requests.ChatCompletionRequest`, which holds the fields)."""

from __future__ import annotations

from typing import Any

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_prompts import io_options, merged_options
from polymodal.processors.chat import ITEM_OPTIONS
from polymodal.server.errors import RequestError


class MediaFields:
    """`media_kwargs()` of a request with `mm_processor_kwargs` and `media_io_kwargs`."""

    def media_kwargs(self) -> dict[str, Any] | None:
        """The options for the request's media; a 400 naming `media_io_kwargs` for an option
        it cannot set, or one both fields set differently."""
        if not self.media_io_kwargs:
            return self.mm_processor_kwargs
        try:
            io = io_options(self.media_io_kwargs, "media_io_kwargs", ITEM_OPTIONS)
            both = "mm_processor_kwargs and media_io_kwargs"
            return merged_options(self.mm_processor_kwargs or {}, io, both)
        except InvalidInputError as exc:
            raise RequestError(str(exc), "media_io_kwargs") from None
