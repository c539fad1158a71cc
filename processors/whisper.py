"""`WhisperProcessor`: audio + task -> the decoder prompt and one cross-attention item for
`WhisperForConditionalGeneration`.

The decoder prompt is what transformers' `WhisperForConditionalGeneration.generate` starts
from (its `_retrieve_init_tokens`): `<|startoftranscript|>`, the language (`language=`, a code
or a name), the task (`transcribe` / `translate`), and `<|notimestamps|>` unless
`timestamps=True`. Text given with the audio (a chat message's text, Pipeline's `text=`) is
previous-context text, as `generate(prompt_ids=get_prompt_ids(text))` puts it:
`<|startofprev|>` + its tokens before the rest; a raw prompt that starts with
`<|startoftranscript|>` is the whole decoder prompt (vLLM's form).

One prompt here is one request: one window of at most `chunk_length` seconds (30 for the
released models), so a multilingual model needs its language. Language detection, timestamp
segments and audio longer than a window run through `whisper_transcription.Transcription`
(Pipeline(audio=...), `polymodal transcribe`, /v1/audio/transcriptions), which uses
`features`, `window_item`, `init_ids` and `timestamp_rules` from here.

The audio (a path, bytes, data: URL or `(waveform, rate)`: `processors/audio.py` decodes,
downmixes and resamples it to 16 kHz) gives log-mel features `[num_mel_bins, frames]`
(`processors/audio_features.WhisperFeatures`, equal to transformers' extractor); a window is
an item of `max_source_positions` encoder rows. Precomputed features `[num_mel_bins,
2 * max_source_positions]` are taken as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.llm_core.host_copy import copy_to
from polymodal.llm_core.timestamp_rules import TimestampRules
from polymodal.processors.audio import load_audio
from polymodal.processors.audio_features import WhisperFeatures, audio_content_hash
from polymodal.processors.base import load_tokenizer
from polymodal.processors.chat import split_messages
from polymodal.processors.hashing import content_hash
from polymodal.processors.input_cache import DEFAULT_MAX_MB, ProcessedInputCache
from polymodal.processors.pixels import read_json
from polymodal.processors.types import CROSS_ATTENTION, MultimodalItem, ProcessedPrompt

TASKS = ("transcribe", "translate")


class WhisperProcessor:
    """Decoder prompts and log-mel items for Whisper checkpoints."""

    MEDIA_OPTIONS: ClassVar[tuple[str, ...]] = ("language", "task", "timestamps")
    MODALITIES: ClassVar[tuple[str, ...]] = ("audio",)

    def __init__(
        self,
        tokenizer: Any,
        *,
        model_dir: str | Path | None = None,
        allow_http: bool = False,
        processed_cache_mb: float = DEFAULT_MAX_MB,
        **_: Any,
    ):
        """`processed_cache_mb` bounds the processed-input cache (0: off; `input_cache.py`):
        a clip given as bytes, a path or a data: URL is decoded and resampled once."""
        self.tokenizer = tokenizer
        self.allow_http = allow_http
        self.input_cache = ProcessedInputCache(processed_cache_mb) if processed_cache_mb else None
        folder = Path(model_dir) if model_dir is not None else None
        generation = (read_json(folder / "generation_config.json") or {}) if folder else {}
        config = (read_json(folder / "config.json") or {}) if folder else {}
        extractor = (read_json(folder / "preprocessor_config.json") or {}) if folder else {}
        if not extractor and folder is not None:
            extractor = (read_json(folder / "processor_config.json") or {}).get(
                "feature_extractor", {}
            )
        self.extractor = WhisperFeatures.from_config(extractor)
        self.sampling_rate = self.extractor.sampling_rate
        self.chunk_length = self.extractor.chunk_length
        self.num_rows = int(config.get("max_source_positions", 1500))
        self.num_frames = 2 * self.num_rows
        self.max_target_positions = int(config.get("max_target_positions", 448))
        self.vocab_size = int(config.get("vocab_size", len(tokenizer)))
        # word timestamps: the cross-attention heads that follow the audio, [[layer, head]]
        self.alignment_heads = generation.get("alignment_heads")
        self.median_filter_width = int(config.get("median_filter_width", 7))
        self.sot = int(
            generation.get("decoder_start_token_id", config.get("decoder_start_token_id", 50258))
        )
        self.lang_to_id = dict(generation.get("lang_to_id") or {})
        self.task_to_id = dict(generation.get("task_to_id") or {})
        self.no_timestamps = generation.get("no_timestamps_token_id")
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        self.eos = int(eos[0] if isinstance(eos, list) else eos) if eos is not None else None
        self.max_initial_timestamp_index = generation.get("max_initial_timestamp_index")
        # `<|0.00|>` onwards are timestamps; `<|nospeech|>` sits before `<|notimestamps|>`
        no_timestamps = self.no_timestamps if self.no_timestamps is not None else 1 << 30
        self.timestamp_begin = int(no_timestamps) + 1
        self.no_speech = int(no_timestamps) - 1
        self.multilingual = bool(generation.get("is_multilingual", bool(self.lang_to_id)))
        # the task `forced_decoder_ids` puts after a detected language (released checkpoints:
        # transcribe; none without them)
        forced = dict(
            generation.get("forced_decoder_ids") or config.get("forced_decoder_ids") or []
        )
        task_names = {int(v): k for k, v in self.task_to_id.items()}
        self.forced_task = task_names.get(forced.get(2))
        self.prev = tokenizer.convert_tokens_to_ids("<|startofprev|>")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> WhisperProcessor:
        model_dir = Path(model_dir)
        return cls(load_tokenizer(model_dir), model_dir=model_dir, **kwargs)

    # ---- the decoder prompt ------------------------------------------------------------
    def prompt_ids(
        self,
        language: str | None = None,
        task: str | None = None,
        timestamps: bool = False,
        previous_text: str | None = None,
    ) -> list[int]:
        """[`<|startofprev|>` previous text] `<|startoftranscript|>` [language] [task]
        [`<|notimestamps|>`] as `generate` builds them (a language without a task means
        transcribe)."""
        if language is None and self.multilingual:
            raise InvalidInputError(
                "language= is required for a multilingual Whisper checkpoint in a raw prompt "
                "(Pipeline(audio=...), `polymodal transcribe` and /v1/audio/transcriptions "
                f"detect it); known: {self.language_codes()}"
            )
        language_id = self.language_id(language) if language is not None else None
        return self.previous_ids(previous_text) + self.init_ids(language_id, task, timestamps)

    def previous_ids(self, previous_text: str | None) -> list[int]:
        """`<|startofprev|>` + the tokens of " text" (transformers' `get_prompt_ids`), or []."""
        if not previous_text or not previous_text.strip():
            return []
        text = " " + previous_text.strip()
        return [self.prev, *self.tokenizer.encode(text, add_special_tokens=False)]

    def init_ids(
        self,
        language_id: int | None,
        task: str | None = None,
        timestamps: bool = False,
        detected: bool = False,
    ) -> list[int]:
        """`<|startoftranscript|>` [language] [task] [`<|notimestamps|>`]. Without a task, a
        given language means transcribe; a `detected` one gets the task the checkpoint's
        `forced_decoder_ids` name, if any (transformers' `_retrieve_init_tokens`)."""
        ids = [self.sot]
        if language_id is not None:
            ids.append(language_id)
        if task is None and language_id is not None:
            task = self.forced_task if detected else "transcribe"
        if task is not None:
            if task not in TASKS or task not in self.task_to_id:
                raise InvalidInputError(f"task={task!r}: choose from {list(self.task_to_id)}")
            ids.append(self.task_to_id[task])
        if not timestamps and self.no_timestamps is not None:
            ids.append(int(self.no_timestamps))
        return ids

    def language_codes(self) -> list[str]:
        """This checkpoint's language codes (`en`, `de`, ...)."""
        return sorted(t.strip("<|>") for t in self.lang_to_id)

    def language_code(self, token_id: int) -> str:
        """The code of a language token id (`<|de|>` -> `de`)."""
        for token, value in self.lang_to_id.items():
            if int(value) == token_id:
                return token.strip("<|>")
        raise InvalidInputError(f"token {token_id} is not one of this checkpoint's languages")

    def decode_text(self, token_ids: list[int]) -> str:
        """The text of output tokens: timestamps and other special tokens left out."""
        text_ids = [t for t in token_ids if t < self.timestamp_begin]
        return self.tokenizer.decode(text_ids, skip_special_tokens=True)

    def timestamp_rules(self) -> TimestampRules:
        """The sampling rules of timestamp decoding, from generation_config.json."""
        if self.no_timestamps is None or self.eos is None:
            raise InvalidInputError(
                "timestamps: this checkpoint's generation_config.json has no "
                "no_timestamps_token_id / eos_token_id"
            )
        return TimestampRules(
            no_timestamps_token_id=int(self.no_timestamps),
            eos_token_id=self.eos,
            max_initial_timestamp_index=self.max_initial_timestamp_index,
        )

    def language_id(self, language: str) -> int:
        """The token id of a language code or name (`de`, `German`); InvalidInputError naming
        the checkpoint's languages for any other."""
        key = language.lower()
        code = TO_LANGUAGE_CODE.get(key, key.strip("<|>"))  # a name (german) or a code
        token = f"<|{code}|>"
        if token not in self.lang_to_id:
            raise InvalidInputError(
                f"language={language!r} is not one of this checkpoint's: {self.language_codes()}"
            )
        return int(self.lang_to_id[token])

    # ---- audio -------------------------------------------------------------------------
    def features(
        self, source: Any, index: int = 0, device: torch.device | None = None
    ) -> tuple[torch.Tensor, float, str]:
        """(`[num_mel_bins, frames]` log-mel features, duration in seconds, the clip's content
        hash) of a clip: one window padded with silence when it fits in one (the extractor's
        default), else the whole clip unpadded (transformers' long-form `truncation=False`: one
        log-mel normalization over the clip).

        `device` (the model's): a clip of one window has its features made there (its
        samples copied over asynchronously; the STFT is ~0.1 ms on a GPU against 10-30 ms on
        one host core). A longer clip's stay on the host: they are held for the whole
        transcription, outside the engine's memory budget. The hash (`audio_content_hash`:
        samples + extractor) needs no features, so nothing is read back from the device."""
        audio = load_audio(
            source,
            index=index,
            sampling_rate=self.sampling_rate,
            allow_http=self.allow_http,
            cache=self.input_cache,
        )
        if audio.num_samples == 0:
            raise MediaError(f"audio {index + 1}: the clip is empty (0 samples)")
        long = audio.num_samples > self.extractor.n_samples
        waveform = audio.waveform
        if device is not None and not long:
            waveform = copy_to(waveform, device)
        features = self.extractor(waveform, pad_to=None if long else "window")
        return features, audio.duration, audio_content_hash(audio.waveform, self.extractor)

    def window_item(
        self, features: torch.Tensor, index: int = 0, key: str | None = None
    ) -> MultimodalItem:
        """One window's features `[num_mel_bins, 2 * max_source_positions]` (host or device)
        as a cross-attention item of `max_source_positions` rows; `key`: its content hash when
        the caller knows one (a clip's hash and the window's place in it), else the features'
        own (read on the host)."""
        if isinstance(features, torch.Tensor):
            features = features.to(torch.float32)
        else:
            features = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if tuple(features.shape) != (self.extractor.feature_size, self.num_frames):
            raise MediaError(
                f"audio {index + 1}: features of shape {tuple(features.shape)}; this model "
                f"takes [{self.extractor.feature_size}, {self.num_frames}] (one "
                f"{self.chunk_length:g} s window)"
            )
        key = key or content_hash("audio", {"input_features": features})
        return MultimodalItem(
            "audio", {"input_features": features}, 0, 0, key, target=CROSS_ATTENTION,
            encoder_rows=self.num_rows,
        )  # fmt: skip

    def audio_item(self, source: Any, index: int = 0) -> MultimodalItem:
        """One request's window: features `[num_mel_bins, frames]` as they are, or a clip of
        at most one window (`source` decoded and resampled by `load_audio`)."""
        if isinstance(source, (np.ndarray, torch.Tensor)) and np.ndim(source) == 2:
            return self.window_item(source, index)
        audio = load_audio(
            source,
            index=index,
            sampling_rate=self.sampling_rate,
            allow_http=self.allow_http,
            cache=self.input_cache,
        )
        if audio.num_samples == 0:
            raise MediaError(f"audio {index + 1}: the clip is empty (0 samples)")
        if audio.duration > self.chunk_length:
            raise MediaError(
                f"audio {index + 1}: {audio.duration:.1f} s is longer than one "
                f"{self.chunk_length:g} s window: one prompt is one window (long-form "
                "transcription runs through Pipeline(audio=...), `polymodal transcribe` and "
                "/v1/audio/transcriptions)"
            )
        features = self.extractor(audio.waveform)
        key = audio_content_hash(audio.waveform, self.extractor)
        return MultimodalItem(
            "audio", {"input_features": features}, 0, 0, key, target=CROSS_ATTENTION,
            encoder_rows=self.num_rows,
        )  # fmt: skip

    # ---- the processor contract ----------------------------------------------------------
    def process_tokens(
        self, token_ids: list[int], refs: list, defaults: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """A tokenized decoder prompt and at most one audio clip; without audio, the decoder
        runs alone (its cross-attention layers skip the request)."""
        if len(refs) > 1 or any(ref.modality != "audio" for ref in refs):
            raise InvalidInputError("Whisper takes one audio clip a request, and no images")
        items = [self.audio_item(refs[0].source)] if refs else []
        return ProcessedPrompt(list(token_ids), None, 0, items)

    def process(
        self,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        images=(),
        videos=(),
        audios=(),
        *,
        language: str | None = None,
        task: str | None = None,
        timestamps: bool = False,
        template: Any = None,
        **options: Any,
    ) -> ProcessedPrompt:
        """One transcription request: one audio window, the task prompt; text with it (a raw
        `prompt`, or the text of chat `messages`, whose one audio part is the clip) is
        previous-context text, unless it is a whole decoder prompt."""
        if images or videos:
            raise InvalidInputError("Whisper takes audio, not images or videos")
        unknown = sorted(k for k, v in options.items() if v is not None)
        if unknown:
            raise InvalidInputError(f"options {unknown} do not apply to Whisper")
        audios = list(audios)
        if messages is not None:
            if prompt is not None or audios:
                raise InvalidInputError("with messages=, give the audio as a message part")
            template_messages, refs = split_messages(messages)
            if any(ref.modality != "audio" for ref in refs):
                raise InvalidInputError("Whisper takes audio, not images or videos")
            audios = [ref.source for ref in refs]
            prompt = _message_text(template_messages)
        if len(audios) != 1:
            raise InvalidInputError(f"Whisper takes one audio clip a request, got {len(audios)}")
        if prompt and prompt.startswith("<|startoftranscript|>"):  # a whole decoder prompt
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = self.prompt_ids(language, task, timestamps, prompt)
        return ProcessedPrompt(ids, None, 0, [self.audio_item(audios[0])])


def _message_text(messages: list[dict[str, Any]]) -> str:
    """The text parts of chat messages (from `split_messages`), joined by spaces."""
    texts = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
            continue
        texts += [part.get("text", "") for part in content if part.get("type") == "text"]
    return " ".join(t for t in texts if t)
