"""`Pipeline`: one call from media + text to a typed result.

pipe = Pipeline("Qwen/Qwen2.5-VL-7B-Instruct")
pipe(image="cat.jpg", text="Describe this image.")        # -> Result
pipe([{"image": "a.jpg", "text": "..."}, {"video": "b.mp4", "text": "..."}])  # batched
for delta in pipe.stream(image="cat.jpg", text="..."): print(delta, end="")
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from polymodal.feeder import run_prompts
from polymodal.llm import LLM
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.outputs import RequestOutput, Timings, Usage
from polymodal.llm_core.sampling_params import SamplingParams


class PipelineRequest(BaseModel):
    """One request: `text` with optional `image` / `images` / `video`, or chat `messages`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    text: str | None = None
    image: Any = None
    images: list[Any] | None = None
    video: Any = None
    messages: list[dict[str, Any]] | None = None
    system: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None
    num_frames: int | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if self.messages is not None and any(
            v is not None for v in (self.text, self.image, self.images, self.video)
        ):
            raise ValueError("give either messages= or text/image/images/video, not both")
        if (
            self.messages is None
            and self.text is None
            and self.image is None
            and not (self.images or self.video is not None)
        ):
            raise ValueError("nothing to do: give text=, image=, images=, video= or messages=")
        if self.image is not None and self.images:
            raise ValueError("give image= or images=, not both")
        return self

    def to_prompt(self) -> dict[str, Any]:
        """The LLM prompt dict: chat messages with media parts, plus media options."""
        messages = self.messages
        if messages is None:
            parts: list[dict[str, Any]] = []
            for img in self.images or ([self.image] if self.image is not None else []):
                parts.append({"type": "image", "image": img})
            if self.video is not None:
                parts.append({"type": "video", "video": self.video})
            parts.append({"type": "text", "text": self.text or ""})
            messages = [{"role": "user", "content": parts}]
            if self.system:
                messages.insert(0, {"role": "system", "content": self.system})
        options = {k: getattr(self, k) for k in ("min_pixels", "max_pixels", "fps", "num_frames")}
        return {"messages": messages, **{k: v for k, v in options.items() if v is not None}}


@dataclass
class Result:
    """What a Pipeline call returns for one request."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    error: str | None = None  # set (and text empty) when this request of a batch was invalid

    @classmethod
    def from_output(cls, out: RequestOutput) -> Result:
        first = out.outputs[0]
        return cls(first.text, first.token_ids, first.finish_reason, out.usage, out.timings)


_SAMPLING_FIELDS = set(SamplingParams.model_fields)


class Pipeline:
    """Load a (multimodal) model and answer requests; see the module docstring."""

    def __init__(self, model: str, **engine_kwargs: Any):
        self.llm = LLM(model, **engine_kwargs)

    def _split(self, kwargs: dict) -> tuple[dict, SamplingParams]:
        params = kwargs.pop("params", None)
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_FIELDS}
        if params is not None and sampling:
            raise InvalidInputError("give params= or sampling keywords, not both")
        return kwargs, params or SamplingParams(**sampling)

    @staticmethod
    def _request(fields: dict) -> PipelineRequest:
        try:
            return PipelineRequest(**fields)
        except ValidationError as exc:
            msg = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidInputError(f"invalid request: {msg}") from None

    def __call__(self, requests: list[dict] | None = None, **kwargs: Any):
        """One request from keywords -> Result; a list of request dicts -> list[Result].

        In a list, an invalid request yields a Result with `error` set; the others still run.
        """
        fields, params = self._split(kwargs)
        if requests is None:
            prompt = self._request(fields).to_prompt()
            return Result.from_output(self.llm.generate(prompt, params)[0])
        if fields:
            raise InvalidInputError(f"with a list of requests, put {sorted(fields)} inside each")
        results: list[Result | None] = [None] * len(requests)
        items = []
        for i, fields_i in enumerate(requests):
            try:
                items.append((i, self._request(dict(fields_i)).to_prompt(), params))
            except PolymodalError as exc:
                results[i] = Result(text="", finish_reason="error", error=f"request {i}: {exc}")
        with closing(run_prompts(self.llm, items)) as finished:
            for done in finished:
                if done.error is None:
                    results[done.key] = Result.from_output(done.output)
                elif isinstance(done.error, PolymodalError):
                    error = f"request {done.key}: {done.error}"
                    results[done.key] = Result(text="", finish_reason="error", error=error)
                else:
                    raise done.error
        return results

    def stream(self, **kwargs: Any) -> Iterator[str]:
        """Yield text deltas of one request as they are generated."""
        fields, params = self._split(kwargs)
        prompt = self._request(fields).to_prompt()
        for out in self.llm.stream(prompt, params):
            if out.outputs[0].delta_text:
                yield out.outputs[0].delta_text
