"""`WhisperProcessor`: audio + task -> the decoder prompt and one cross-attention item for
`WhisperForConditionalGeneration`.

The decoder prompt is what transformers' `WhisperForConditionalGeneration.generate` starts
from (its `_retrieve_init_tokens`): `<|startoftranscript|>`, the language (`language=`, a code
or a name; a multilingual model needs one: language detection is not done here), the task
(`transcribe` / `translate`), and `<|notimestamps|>` unless `timestamps=True`; a text prompt
given as well is appended as is (a raw decoder prompt, vLLM's form). The audio is one window
of at most `chunk_length` seconds (30 for the released models): its log-mel features
`[num_mel_bins, 2 * max_source_positions]`, an item of `max_source_positions` encoder rows.

Log-mel features: given as `input_features`, or computed from a 16 kHz mono float waveform by
transformers' `WhisperFeatureExtractor` until `processors/audio.py` (decoding, resampling,
log-mel; another branch) lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from polymodal.llm_core.errors import InvalidInputError, MediaError
from polymodal.processors.base import load_tokenizer
from polymodal.processors.hashing import content_hash
from polymodal.processors.pixels import read_json
from polymodal.processors.types import CROSS_ATTENTION, MultimodalItem, ProcessedPrompt

TASKS = ("transcribe", "translate")
# transformers' `TO_LANGUAGE_CODE` names for the codes most asked for; any code works as is
LANGUAGE_NAMES = {
    "english": "en",
    "german": "de",
    "french": "fr",
    "spanish": "es",
    "chinese": "zh",
    "japanese": "ja",
    "italian": "it",
    "portuguese": "pt",
}


class WhisperProcessor:
    """Decoder prompts and log-mel items for Whisper checkpoints."""

    MEDIA_OPTIONS: ClassVar[tuple[str, ...]] = ("language", "task", "timestamps")
    takes_audio: ClassVar[bool] = True  # `process(audios=...)` (vLLM's multi_modal_data["audio"])

    def __init__(self, tokenizer: Any, *, model_dir: str | Path | None = None, **_: Any):
        self.tokenizer = tokenizer
        folder = Path(model_dir) if model_dir is not None else None
        generation = (read_json(folder / "generation_config.json") or {}) if folder else {}
        config = (read_json(folder / "config.json") or {}) if folder else {}
        extractor = (read_json(folder / "preprocessor_config.json") or {}) if folder else {}
        if not extractor and folder is not None:
            extractor = (read_json(folder / "processor_config.json") or {}).get(
                "feature_extractor", {}
            )
        self.extractor_config = extractor
        self.sampling_rate = int(extractor.get("sampling_rate", 16000))
        self.chunk_length = float(extractor.get("chunk_length", 30))
        self.num_rows = int(config.get("max_source_positions", 1500))
        self.num_frames = 2 * self.num_rows
        self.sot = int(
            generation.get("decoder_start_token_id", config.get("decoder_start_token_id", 50258))
        )
        self.lang_to_id = dict(generation.get("lang_to_id") or {})
        self.task_to_id = dict(generation.get("task_to_id") or {})
        self.no_timestamps = generation.get("no_timestamps_token_id")
        self.multilingual = bool(generation.get("is_multilingual", bool(self.lang_to_id)))
        self._extractor = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs: Any) -> WhisperProcessor:
        model_dir = Path(model_dir)
        return cls(load_tokenizer(model_dir), model_dir=model_dir, **kwargs)

    # ---- the decoder prompt ------------------------------------------------------------
    def prompt_ids(
        self, language: str | None = None, task: str | None = None, timestamps: bool = False
    ) -> list[int]:
        """`<|startoftranscript|>` [language] [task] [`<|notimestamps|>`] as `generate` builds
        them (a language without a task means transcribe)."""
        ids = [self.sot]
        if language is not None:
            ids.append(self._language_id(language))
        elif self.multilingual:
            raise InvalidInputError(
                "language= is required for a multilingual Whisper checkpoint (language "
                f"detection is not supported yet); known: {sorted(self.lang_to_id)}"
            )
        if task is not None or language is not None:
            task = task or "transcribe"
            if task not in TASKS or task not in self.task_to_id:
                raise InvalidInputError(f"task={task!r}: choose from {list(self.task_to_id)}")
            ids.append(self.task_to_id[task])
        if not timestamps and self.no_timestamps is not None:
            ids.append(int(self.no_timestamps))
        return ids

    def _language_id(self, language: str) -> int:
        key = language.lower()
        code = LANGUAGE_NAMES.get(key, key.strip("<|>"))
        token = f"<|{code}|>"
        if token not in self.lang_to_id:
            raise InvalidInputError(
                f"language={language!r} is not one of this checkpoint's: "
                f"{sorted(t.strip('<|>') for t in self.lang_to_id)}"
            )
        return int(self.lang_to_id[token])

    # ---- audio -------------------------------------------------------------------------
    def features(self, audio: Any, sampling_rate: int | None = None) -> torch.Tensor:
        """float32 log-mel `[num_mel_bins, frames]` of one window: `audio` is a 1-D waveform
        (numpy / torch / list, at the extractor's rate) or already such features."""
        if isinstance(audio, tuple):  # vLLM's (waveform, sampling rate)
            audio, sampling_rate = audio
        data = torch.as_tensor(np.asarray(audio, dtype=np.float32))
        if data.dim() == 2:  # precomputed features
            if data.shape[-1] != self.num_frames:
                raise MediaError(
                    f"audio features have {data.shape[-1]} frames; this model takes "
                    f"{self.num_frames} (one {self.chunk_length:g} s window)"
                )
            return data
        if data.dim() != 1 or data.numel() == 0:
            raise MediaError(
                f"audio must be a non-empty mono waveform, got shape {tuple(data.shape)}"
            )
        rate = sampling_rate or self.sampling_rate
        if rate != self.sampling_rate:
            raise MediaError(
                f"audio at {rate} Hz: this model takes {self.sampling_rate} Hz (resampling "
                "comes with processors/audio.py)"
            )
        seconds = data.numel() / rate
        if seconds > self.chunk_length:
            raise MediaError(
                f"audio of {seconds:.1f} s is longer than one {self.chunk_length:g} s window "
                "(long-form transcription is not supported yet)"
            )
        extractor = self._feature_extractor()
        out = extractor(data.numpy(), sampling_rate=rate, return_tensors="pt")
        return out["input_features"][0]

    def _feature_extractor(self):
        if self._extractor is None:
            from transformers import WhisperFeatureExtractor

            known = ("feature_size", "sampling_rate", "hop_length", "chunk_length", "n_fft",
                     "padding_value")  # fmt: skip
            self._extractor = WhisperFeatureExtractor(
                **{k: v for k, v in self.extractor_config.items() if k in known}
            )
        return self._extractor

    def audio_item(self, audio: Any, sampling_rate: int | None = None) -> MultimodalItem:
        """One window's features as a cross-attention item of `max_source_positions` rows."""
        features = self.features(audio, sampling_rate)
        key = content_hash("audio", {"input_features": features})
        return MultimodalItem(
            "audio", {"input_features": features}, 0, 0, key, target=CROSS_ATTENTION,
            encoder_rows=self.num_rows,
        )  # fmt: skip

    # ---- the processor contract ----------------------------------------------------------
    def process_tokens(
        self, token_ids: list[int], refs: list, defaults: dict[str, Any] | None = None
    ) -> ProcessedPrompt:
        """A tokenized decoder prompt: without audio, the decoder runs alone (its
        cross-attention layers skip the request)."""
        if refs:
            raise InvalidInputError("give audio with a text 'prompt' (the decoder prompt)")
        return ProcessedPrompt(list(token_ids), None, 0, [])

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
        """One transcription request: the task prompt (plus `prompt`, a raw decoder prompt, if
        given) and its one audio window."""
        if messages is not None or images or videos:
            raise InvalidInputError("Whisper takes audio and a decoder prompt, not chat or images")
        unknown = sorted(k for k, v in options.items() if v is not None)
        if unknown:
            raise InvalidInputError(f"options {unknown} do not apply to Whisper")
        if len(audios) != 1:
            raise InvalidInputError(f"Whisper takes one audio window a request, got {len(audios)}")
        ids = self.prompt_ids(language, task, timestamps)
        if prompt and prompt.startswith("<|startoftranscript|>"):
            ids = []  # a whole decoder prompt, vLLM's form
        if prompt:
            ids += self.tokenizer.encode(prompt, add_special_tokens=False)
        return ProcessedPrompt(ids, None, 0, [self.audio_item(audios[0])])
