"""The prompt forms `LLM` takes -> one call of the model's processor.

    "a raw prompt"                               text, tokenized as is
    [1, 2, 3]                                    token ids
    [{"role": "user", "content": ...}, ...]      chat messages (the chat template renders them)
    {"prompt": ..., "multi_modal_data": {"image": img | [imgs], "video": v | [vs]},
     "mm_processor_kwargs": {"max_pixels": ...}}                         vLLM's text prompt
    {"prompt": "<|startoftranscript|>...", "multi_modal_data": {"audio": (waveform, rate)}}
                                                 vLLM's Whisper prompt (one clip: a tuple)
    {"prompt_token_ids": [...], "multi_modal_data": ...}                 vLLM's tokens prompt
    {"messages": [...], "tools": [...], "chat_template": ..., "chat_template_kwargs": {...},
     "add_generation_prompt": True, "continue_final_message": False, "mm_processor_kwargs": ...,
     "documents": [...], "add_special_tokens": False}
    {"prompt": ..., "images": [...], "videos": [...], "max_pixels": ...}   polymodal's own form
    {"prompt_embeds": tensor [num_tokens, hidden_size]}    vLLM's embeddings prompt (the engine
                                                 needs enable_prompt_embeds=True)
    any dict form + "cache_salt": "..."    vLLM's: prefix-cache blocks shared only within a salt
    any dict form + "priority": 1          scheduling priority (lower first; "priority" policy)

Audio (`multi_modal_data={"audio": ...}`, `audios=[...]`, or `input_audio` / `audio_url` /
`audio` message parts) goes only to a model whose processor takes it (`MODALITIES`); any
other model refuses it with an error naming the model.

`generate`'s one-or-a-list arguments become one entry per prompt here too (`as_batch`,
`params_per_prompt`, `loras_per_prompt`).

A raw multimodal prompt marks each item with the model's placeholder (Qwen2-VL:
`<|vision_start|><|image_pad|><|vision_end|>`), in the order of the media given. A dict key
that is none of these raises an error naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.lora import LoRARequest
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.chat import ChatTemplateOptions, MediaRef, part_modality
from polymodal.processors.image_embeds import split_batched
from polymodal.processors.prompt_embeds import embeds_prompt
from polymodal.processors.text import TextProcessor
from polymodal.processors.types import ProcessedPrompt

# Per-request media options (also vLLM's `mm_processor_kwargs` keys for Qwen-VL models).
MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames")
TEMPLATE_KEYS = (
    "tools",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "documents",
    "add_special_tokens",
)
SOURCE_KEYS = ("prompt", "prompt_token_ids", "messages", "prompt_embeds")
PROMPT_KEYS = {*SOURCE_KEYS, "multi_modal_data", "mm_processor_kwargs", "images", "videos"}
PROMPT_KEYS |= {"audios"}
PROMPT_KEYS |= {*MEDIA_OPTIONS, *TEMPLATE_KEYS, "cache_salt", "priority"}
# multi_modal_data key -> media list
MODALITIES = {"image": "images", "video": "videos", "audio": "audios"}


def media_options(
    kwargs: dict[str, Any] | None, where: str, allowed: tuple[str, ...] = MEDIA_OPTIONS
) -> dict[str, Any]:
    """Check `mm_processor_kwargs`-style options: only `allowed` keys (the processor's
    `MEDIA_OPTIONS`; Qwen-VL's by default) are understood."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise InvalidInputError(
            f"{where} has unsupported key(s) {unknown}; supported: {list(allowed)}"
        )
    return {k: v for k, v in kwargs.items() if v is not None}


# vLLM's `media_io_kwargs` (per modality, what its media loaders take) -> the media option
IO_OPTIONS = {("video", "num_frames"): "num_frames", ("video", "fps"): "fps"}


def io_options(
    kwargs: dict[str, Any] | None, where: str, allowed: tuple[str, ...] = MEDIA_OPTIONS
) -> dict[str, Any]:
    """vLLM's `media_io_kwargs` (`{"video": {"num_frames": 32}}`) as media options: the video
    loader's frame count and rate; anything else is refused naming it."""
    options: dict[str, Any] = {}
    for modality, values in (kwargs or {}).items():
        if not isinstance(values, dict):
            raise InvalidInputError(f"{where}[{modality!r}] must be an object of options")
        for key, value in values.items():
            name = IO_OPTIONS.get((modality, key))
            if name is None or name not in allowed:
                takes = [f"{m}.{k}" for (m, k), n in IO_OPTIONS.items() if n in allowed]
                raise InvalidInputError(
                    f"{where} has unsupported option {modality}.{key}; supported: {takes}"
                )
            if value is not None:
                options[name] = value
    return options


def merged_options(first: dict[str, Any], second: dict[str, Any], where: str) -> dict[str, Any]:
    """Two sources of media options for one prompt (or engine); a key both set differently is
    refused naming it."""
    clash = sorted(k for k in set(first) & set(second) if first[k] != second[k])
    if clash:
        raise InvalidInputError(f"{where}: {clash} set twice with different values")
    return {**first, **second}


def check_modalities(processor: Any, used: set[str], model: str) -> None:
    """Refuse audio for a model whose processor takes none (it has no audio encoder)."""
    takes = tuple(processor.MODALITIES)
    if "audio" in used and "audio" not in takes:
        raise InvalidInputError(
            f"model {model} takes no audio input: it has no audio encoder (it takes "
            f"{', '.join(takes) or 'text only'})"
        )


def prompt_modalities(prompt: Any) -> set[str]:
    """The media kinds a prompt carries (message parts, multi_modal_data, media keys), read
    without loading anything."""
    messages = prompt if is_messages(prompt) else None
    found: set[str] = set()
    if isinstance(prompt, dict):
        messages = prompt.get("messages") if isinstance(prompt.get("messages"), list) else None
        data = prompt.get("multi_modal_data")
        found |= set(data) & set(MODALITIES) if isinstance(data, dict) else set()
        found |= {m for m, key in MODALITIES.items() if prompt.get(key)}
    for message in messages or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            found |= {part_modality(part) for part in content} - {None}
    return found


def process_prompt(
    processor: Any, prompt: Any, default_options: dict[str, Any] | None = None, model: str = ""
) -> ProcessedPrompt:
    """One prompt in any form above -> `ProcessedPrompt` (media loaded, template rendered).

    `default_options` (the LLM's `mm_processor_kwargs`) apply unless the prompt sets them;
    `model` names the model in the error for media it does not take.
    """
    check_modalities(processor, prompt_modalities(prompt), model or "this model")
    options = dict(default_options or {})
    text_only = isinstance(processor, TextProcessor)
    allowed = tuple(getattr(processor, "MEDIA_OPTIONS", MEDIA_OPTIONS))
    if isinstance(prompt, ProcessedPrompt):
        return prompt
    if isinstance(prompt, str):
        return processor.process(prompt=prompt, **options)
    if is_token_ids(prompt):
        return _tokens(processor, list(prompt), [], options, text_only)
    if is_messages(prompt):
        return processor.process(messages=list(prompt), **options)
    if not isinstance(prompt, dict):
        raise InvalidInputError(
            f"unsupported prompt of type {type(prompt).__name__}: pass a string, token ids, "
            "chat messages, or a dict with 'prompt', 'prompt_token_ids' or 'messages'"
        )
    unknown = sorted(set(prompt) - PROMPT_KEYS - set(allowed))
    if unknown:
        known = sorted(PROMPT_KEYS | set(allowed))
        raise InvalidInputError(f"unknown prompt key(s) {unknown}; known: {known}")
    sources = [k for k in SOURCE_KEYS if k in prompt]
    if len(sources) != 1:
        raise InvalidInputError(
            f"a prompt dict needs exactly one of {list(SOURCE_KEYS)}, got {sources or 'none'}"
        )
    salt, priority = prompt.get("cache_salt"), prompt.get("priority", 0)
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise InvalidInputError(f"cache_salt must be a non-empty string, got {salt!r}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInputError(f"priority must be an integer, got {priority!r}")
    processed = _process_dict(processor, prompt, options, allowed, text_only)
    if salt is None and priority == 0:
        return processed
    # a copy: a processor may hand out one cached ProcessedPrompt for repeated media
    return dataclasses.replace(processed, cache_salt=salt, priority=priority)


def _process_dict(processor, prompt: dict, options: dict, allowed: tuple, text_only: bool):
    """`process_prompt` of a checked prompt dict."""
    if "prompt_embeds" in prompt:
        extra = sorted(set(prompt) - {"prompt_embeds", "cache_salt", "priority"})
        if extra:
            raise InvalidInputError(f"a prompt_embeds prompt takes no {extra}")
        return embeds_prompt(prompt["prompt_embeds"])
    keys = dict.fromkeys([*MEDIA_OPTIONS, *allowed])
    options.update({k: prompt[k] for k in keys if prompt.get(k) is not None})
    options.update(media_options(prompt.get("mm_processor_kwargs"), "mm_processor_kwargs", allowed))
    media = _media(prompt)
    template = {k: prompt[k] for k in TEMPLATE_KEYS if k in prompt}
    if template and "messages" not in prompt:
        raise InvalidInputError(f"{sorted(template)} apply to 'messages' prompts only")
    if not media["audios"]:
        del media["audios"]  # only processors that take audio know the keyword
    if "messages" in prompt:
        if any(media.values()):
            raise InvalidInputError("with 'messages', give media as message parts")
        opts = ChatTemplateOptions(**template)
        opts.chat_template_kwargs = opts.chat_template_kwargs or {}
        return processor.process(messages=prompt["messages"], template=opts, **options)
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not is_token_ids(ids):
            raise InvalidInputError("prompt_token_ids must be a non-empty list of ints")
        refs = [MediaRef("image", s) for s in media["images"]]
        refs += [MediaRef("video", s) for s in media["videos"]]
        refs += [MediaRef("audio", s) for s in media.get("audios", ())]
        return _tokens(processor, list(ids), refs, options, text_only)
    return processor.process(prompt=prompt["prompt"], **media, **options)


def _media(prompt: dict) -> dict[str, list]:
    """`images` / `videos` lists from polymodal's keys or vLLM's `multi_modal_data`."""
    media = {key: list(prompt.get(key) or ()) for key in MODALITIES.values()}
    data = prompt.get("multi_modal_data") or {}
    if not isinstance(data, dict):
        raise InvalidInputError("multi_modal_data must be a dict like {'image': [...]}")
    for key, items in data.items():
        if key not in MODALITIES:
            raise InvalidInputError(
                f"multi_modal_data[{key!r}]: unsupported modality; supported: {list(MODALITIES)}"
            )
        one = (key == "video" and _is_frame_list(items)) or (key == "audio" and _is_clip(items))
        if one or not isinstance(items, (list, tuple)):
            items = [items]  # one item (a video given as a list of frames is one item)
        media[MODALITIES[key]].extend(split_batched(items) if key == "image" else items)
    return media


def _is_clip(items: Any) -> bool:
    """vLLM's `(waveform, sampling_rate)` pair is one audio clip, not a list of two (a pair of
    a waveform and something else too: its loader then names the bad rate)."""
    if not isinstance(items, tuple) or len(items) != 2:
        return False
    return isinstance(items[1], (int, float)) or (
        hasattr(items[0], "shape") and not hasattr(items[1], "shape")
    )


def _is_frame_list(items: Any) -> bool:
    """A list of PIL images or arrays is one video's frames, not a list of videos."""
    if not isinstance(items, (list, tuple)) or not items:
        return False
    first = items[0]
    return hasattr(first, "getpixel") or (hasattr(first, "shape") and len(first.shape) == 3)


def _tokens(processor, ids: list[int], refs: list, options: dict, text_only: bool):
    if text_only:
        if refs:
            raise InvalidInputError("this model is text-only: it takes no images or videos")
        return ProcessedPrompt(ids, None, 0)
    return processor.process_tokens(ids, refs, options)


def with_priority(prompt: Any, priority: int) -> Any:
    """`prompt` (any form above) as a dict carrying `priority` (vLLM's `generate(priority=)`)."""
    if priority == 0:
        return prompt
    if isinstance(prompt, ProcessedPrompt):
        return dataclasses.replace(prompt, priority=priority)
    if isinstance(prompt, dict):
        return {**prompt, "priority": priority}
    if isinstance(prompt, str):
        return {"prompt": prompt, "priority": priority}
    if is_token_ids(prompt):
        return {"prompt_token_ids": list(prompt), "priority": priority}
    if is_messages(prompt):
        return {"messages": list(prompt), "priority": priority}
    return prompt  # not a prompt: process_prompt names what it is


def is_token_ids(x: Any) -> bool:
    """A non-empty list/tuple of ints."""
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(t, int) for t in x)


def is_messages(x: Any) -> bool:
    """A non-empty list of {"role": ...} dicts."""
    return (
        isinstance(x, (list, tuple))
        and bool(x)
        and all(isinstance(m, dict) and "role" in m for m in x)
    )


def as_batch(prompts: Any) -> list:
    """One prompt (any form above) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict, ProcessedPrompt)) or is_token_ids(prompts):
        return [prompts]
    if is_messages(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise InvalidInputError(f"prompts must be a prompt or a list of prompts, got {prompts!r:.80}")


def params_per_prompt(params: Any, n: int) -> list[SamplingParams]:
    """One SamplingParams for every prompt, or a list with one per prompt."""
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, (list, tuple)) or not all(
        isinstance(p, SamplingParams) for p in params
    ):
        raise InvalidInputError(
            f"sampling_params must be a SamplingParams or a list of them, got "
            f"{type(params).__name__}"
        )
    params = list(params)
    if len(params) != n:
        raise InvalidInputError(f"{len(params)} sampling params given for {n} prompts")
    return params


def loras_per_prompt(lora_request: Any, n: int) -> list:
    """One adapter (or None) per prompt from `generate(lora_request=...)`."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    if not isinstance(lora_request, (list, tuple)):
        raise InvalidInputError(
            f"lora_request must be a LoRARequest or a list of them, got "
            f"{type(lora_request).__name__}"
        )
    if len(lora_request) != n:
        raise InvalidInputError(f"{len(lora_request)} lora requests given for {n} prompts")
    return list(lora_request)
