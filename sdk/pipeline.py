"""`Pipeline`: one call from media + text to a typed result.

pipe = Pipeline("Qwen/Qwen2.5-VL-7B-Instruct")
pipe(image="cat.jpg", text="Describe this image.")        # -> Result
pipe([{"image": "a.jpg", "text": "..."}, {"video": "b.mp4", "text": "..."}])  # batched
for delta in pipe.stream(image="cat.jpg", text="..."): print(delta, end="")

transformers' `pipeline("image-text-to-text")` call forms work too: `pipe(images=img,
text="...")`, `pipe("cat.jpg", text="...")`, `pipe(text=messages)` (chat messages with image
parts), with `max_new_tokens=`, `do_sample=`, `num_return_sequences=` or
`generate_kwargs={...}`. The model's generation_config.json supplies every sampling value the
call does not set, as in transformers.

A speech model (Whisper) transcribes `audio=` clips of any length through `polymodal.speech`:
`pipe(audio="talk.mp3")` detects the language when none is given (`Result.language`),
`timestamps=True` gives `Result.segments` (start, end, text), a clip longer than one window is
decoded window after window (with timestamps), and `text=` is previous-context text.
As transformers' `generate` takes them: `temperature=(0.0, 0.2, ..., 1.0)` with
`compression_ratio_threshold=`, `logprob_threshold=`, `no_speech_threshold=` (temperature
fallback), `condition_on_prev_tokens=True`; `word_timestamps=True` gives each segment's
`token_timestamps` and `words` (the checkpoint needs `alignment_heads`).
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
from polymodal.llm_core.outputs import CompletionOutput, RequestOutput, Timings, Usage
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_prompts import MEDIA_OPTIONS, is_messages
from polymodal.processors.whisper_segments import Segment, Transcript
from polymodal.speech import run_transcriptions, takes_transcription

SPEECH_OPTIONS = ("language", "task", "timestamps")  # reach processors that take them
# only a speech model's transcription (`polymodal.speech`) takes these
TRANSCRIPTION_OPTIONS = ("condition_on_prev_tokens", "compression_ratio_threshold",
                         "logprob_threshold", "no_speech_threshold", "word_timestamps")  # fmt: skip


class PipelineRequest(BaseModel):
    """One request: `text` with optional `image` / `images` / `video` / `audio`, or chat
    `messages`. `audio` (a path, bytes, data: URL or `(array, sampling_rate)`; or a list of
    them) goes to models with an audio encoder; others refuse it, naming the model."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    text: str | None = None
    image: Any = None
    images: list[Any] | None = None
    video: Any = None
    audio: Any = None
    messages: list[dict[str, Any]] | None = None
    system: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    # speech models (Whisper): the spoken language, "transcribe" / "translate", timestamps
    language: str | None = None
    task: str | None = None
    timestamps: bool | None = None
    # speech models: temperature fallback thresholds, previous-window context, word times
    condition_on_prev_tokens: bool | None = None
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = None
    no_speech_threshold: float | None = None
    word_timestamps: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _transformers_forms(cls, data: Any) -> Any:
        """`text=` holding chat messages, and `images=` holding one image."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if is_messages(data.get("text")):
            if data.get("messages") is not None:
                raise ValueError("give chat messages as messages= or text=, not both")
            data["messages"] = data.pop("text")
        images = data.get("images")
        if images is not None and not isinstance(images, (list, tuple)):
            data["images"] = [images]
        return data

    @model_validator(mode="after")
    def _one_source(self):
        if self.messages is not None and any(
            v is not None for v in (self.image, self.images, self.video, self.audio)
        ):
            raise ValueError(
                "give media inside the chat messages, or use text= with image/images/video/audio"
            )
        if self.messages is not None and self.text is not None:
            raise ValueError("give either messages= or text=, not both")
        if (
            self.messages is None
            and self.text is None
            and self.image is None
            and not (self.images or self.video is not None or self.audio is not None)
        ):
            raise ValueError(
                "nothing to do: give text=, image=, images=, video=, audio= or messages="
            )
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
            audios = self.audio if isinstance(self.audio, list) else [self.audio]
            for clip in audios if self.audio is not None else ():
                parts.append({"type": "audio", "audio": clip})
            parts.append({"type": "text", "text": self.text or ""})
            messages = [{"role": "user", "content": parts}]
            if self.system:
                messages.insert(0, {"role": "system", "content": self.system})
        given = [k for k in TRANSCRIPTION_OPTIONS if getattr(self, k) is not None]
        if given:
            raise InvalidInputError(
                f"{given} apply to a speech model's (Whisper's) audio= transcription only"
            )
        options = {k: getattr(self, k) for k in (*MEDIA_OPTIONS, *SPEECH_OPTIONS)}
        return {"messages": messages, **{k: v for k, v in options.items() if v is not None}}


@dataclass
class Result:
    """What a Pipeline call returns for one request.

    `text`, `token_ids` and `finish_reason` are the first completion's; `outputs` holds all
    `n` of them (vLLM's `CompletionOutput`s: text, token_ids, finish_reason, logprobs, ...)
    and `texts` their texts, in order.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    error: str | None = None  # set (and text empty) when this request of a batch was invalid
    outputs: list[CompletionOutput] = field(default_factory=list)
    language: str | None = None  # speech models: the language transcribed (given or detected)
    segments: list[Segment] | None = None  # speech models, timestamps=True or long-form

    @property
    def texts(self) -> list[str]:
        """Every completion's text (`n` of them), in order."""
        return [o.text for o in self.outputs]

    @classmethod
    def from_transcript(cls, transcript: Transcript) -> Result:
        """A speech model's transcript: segments when decoded with timestamps."""
        usage = Usage(transcript.prompt_tokens, transcript.completion_tokens)
        timed = transcript.timestamps or any(s.words is not None for s in transcript.segments)
        segments = transcript.segments if timed else None
        return cls(
            transcript.text, transcript.token_ids, transcript.finish_reason, usage,
            language=transcript.language, segments=segments,
        )  # fmt: skip

    @classmethod
    def from_output(cls, out: RequestOutput) -> Result:
        first = out.outputs[0]
        return cls(
            first.text, first.token_ids, first.finish_reason, out.usage, out.timings,
            outputs=list(out.outputs),
        )  # fmt: skip


_SAMPLING_FIELDS = set(SamplingParams.model_fields)
# transformers' generate() names -> SamplingParams fields
_TRANSFORMERS_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "num_return_sequences": "n",
}


class Pipeline:
    """Load a (multimodal) model and answer requests; see the module docstring.

    `allow_http=True` lets requests name http(s) media URLs (off by default); other keywords
    go to `LLM` (engine options).
    """

    def __init__(self, model: str, *, allow_http: bool = False, **engine_kwargs: Any):
        self.llm = LLM(model, allow_http=allow_http, **engine_kwargs)

    def _split(self, kwargs: dict) -> tuple[dict, SamplingParams]:
        params = kwargs.pop("params", None)
        sampling = dict(kwargs.pop("generate_kwargs", None) or {})
        for key in list(kwargs):
            if key in _SAMPLING_FIELDS or key in _TRANSFORMERS_NAMES or key == "do_sample":
                sampling[key] = kwargs.pop(key)
        if params is not None and sampling:
            raise InvalidInputError("give params= or sampling keywords, not both")
        if params is not None:
            return kwargs, params
        for name, ours in _TRANSFORMERS_NAMES.items():
            if name in sampling:
                if ours in sampling:
                    raise InvalidInputError(f"give {name}= or {ours}=, not both")
                sampling[ours] = sampling.pop(name)
        if sampling.pop("do_sample", True) is False:  # transformers' greedy decoding
            if sampling.get("temperature", 0.0) != 0.0:
                raise InvalidInputError("do_sample=False is greedy: it takes no temperature")
            sampling["temperature"] = 0.0
        return kwargs, SamplingParams(**sampling).with_defaults(self.llm.default_sampling)

    @staticmethod
    def _request(fields: dict) -> PipelineRequest:
        try:
            return PipelineRequest(**fields)
        except ValidationError as exc:
            msg = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()
            )
            raise InvalidInputError(f"invalid request: {msg}") from None

    def __call__(self, inputs: Any = None, **kwargs: Any):
        """One request from keywords -> Result; a list of request dicts -> list[Result].

        `inputs` may also be chat messages, or transformers' positional images (a path, URL,
        image or list of them). In a list of requests, an invalid one yields a Result with
        `error` set; the others still run.
        """
        temperatures = _fallback_temperatures(kwargs)
        fields, params = self._split(kwargs)
        requests = None
        if (
            isinstance(inputs, (list, tuple))
            and inputs
            and all(isinstance(r, dict) for r in inputs)
        ):
            requests = inputs if not is_messages(inputs) else None
            if requests is None:
                fields = {**fields, "messages": list(inputs)}
        elif inputs is not None:
            if "images" in fields or "image" in fields:
                raise InvalidInputError("give the images positionally or as images=, not both")
            fields = {**fields, "images": inputs}
        if requests is None:
            request = self._request(fields)
            job = self._transcription(request, params, temperatures)
            if job is not None:
                done = next(run_transcriptions(self.llm, [(0, *job)], workers=1))
                if done.error is not None:
                    raise done.error
                return Result.from_transcript(done.output)
            prompt = request.to_prompt()
            return Result.from_output(self.llm.generate(prompt, params, use_tqdm=False)[0])
        if fields:
            raise InvalidInputError(f"with a list of requests, put {sorted(fields)} inside each")
        results: list[Result | None] = [None] * len(requests)
        items, jobs = [], []
        for i, fields_i in enumerate(requests):
            try:
                request = self._request(dict(fields_i))
                job = self._transcription(request, params, temperatures)
                if job is not None:
                    jobs.append((i, *job))
                else:
                    items.append((i, request.to_prompt(), params))
            except PolymodalError as exc:
                results[i] = Result(text="", finish_reason="error", error=f"request {i}: {exc}")
        runs = [run_prompts(self.llm, items)] if items else []
        runs += [run_transcriptions(self.llm, jobs)] if jobs else []
        for run in runs:
            with closing(run) as finished:
                for done in finished:
                    if done.error is None:
                        results[done.key] = (
                            Result.from_transcript(done.output)
                            if isinstance(done.output, Transcript)
                            else Result.from_output(done.output)
                        )
                    elif isinstance(done.error, PolymodalError):
                        error = f"request {done.key}: {done.error}"
                        results[done.key] = Result(text="", finish_reason="error", error=error)
                    else:
                        raise done.error
        return results

    def _transcription(
        self, request: PipelineRequest, params: SamplingParams, temperatures: tuple | None
    ) -> tuple | None:
        """`(audio, params, options)` of a speech model's `audio=` request (Whisper: detected
        language, timestamps, long-form, fallback, word times); None for any other request."""
        if request.audio is None or not takes_transcription(self.llm.processor):
            if temperatures is not None:
                raise InvalidInputError(
                    "temperature as a list is Whisper's temperature fallback: it applies to a "
                    "speech model's audio= transcription only"
                )
            return None
        if isinstance(request.audio, list) or request.image is not None or request.images:
            raise InvalidInputError("a speech model takes one audio clip a request, no images")
        if request.video is not None:
            raise InvalidInputError("a speech model takes audio, not video")
        options = {
            "language": request.language,
            "task": request.task,
            "timestamps": bool(request.timestamps),
            "previous_text": request.text,
            "temperatures": temperatures,
            **{k: getattr(request, k) for k in TRANSCRIPTION_OPTIONS},
        }
        options["condition_on_prev_tokens"] = bool(request.condition_on_prev_tokens)
        options["word_timestamps"] = bool(request.word_timestamps)
        return request.audio, params, options

    def stream(self, **kwargs: Any) -> Iterator[str]:
        """Yield text deltas of one request as they are generated (the first completion's)."""
        fields, params = self._split(kwargs)
        prompt = self._request(fields).to_prompt()
        for out in self.llm.stream(prompt, params):
            if out.outputs[0].delta_text:
                yield out.outputs[0].delta_text


def _fallback_temperatures(kwargs: dict) -> tuple[float, ...] | None:
    """A `temperature=` list or tuple (Whisper's fallback, as transformers takes it): the
    first becomes the sampling temperature, all of them the transcription's `temperatures`."""
    temperature = kwargs.get("temperature")
    if not isinstance(temperature, (list, tuple)):
        return None
    if not temperature:
        raise InvalidInputError("temperature=[]: give one or more temperatures")
    kwargs["temperature"] = temperature[0]
    return tuple(temperature)
