"""Tiny random-weight checkpoints built offline: the README's demo model and the tests' fixtures.

`write_demo_checkpoint(dir, "qwen2_vl")` writes config.json, model.safetensors, a small
byte-level BPE tokenizer with a ChatML chat template and, for vision models, the HF
processor configs, exactly as `save_pretrained` lays them out. The weights are random:
the text such a model writes is gibberish by construction.
"""

from __future__ import annotations

from pathlib import Path

import torch

from polymodal.llm_core.models.tiny import TINY_TEXT

# ChatML with Qwen2-VL's media markers; add_vision_id numbers pictures/videos as Qwen does.
# With `tools`, the system turn lists them and tool calls / results use Qwen2.5's (Hermes)
# <tool_call> / <tool_response> format.
_TOOLS_SYSTEM = (
    "{% if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}\n\n# Tools"
    "\n\nYou may call one or more functions to assist with the user query.\n\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call>"
    ' XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n{% endif %}"
)
_TOOL_TURNS = (
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif message['role'] == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message['content'] %}{{ message['content'] }}\n{% endif %}"
    '{% for call in message.tool_calls %}<tool_call>\n{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}'
    "<|im_end|>\n{% else %}"
)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    + _TOOLS_SYSTEM
    + "{% for message in messages %}"
    "{% if loop.first and not tools and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    + _TOOL_TURNS
    + "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_CORPUS = """The quick brown fox jumps over the lazy dog. A picture shows a cat sitting on a mat.
Describe this image. What is in the video? The sky is blue and the grass is green.
Once upon a time there was a small model that wrote random words, one token at a time.
Images, video and audio become embeddings that fill slots in the token stream of a decoder.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000, punctuation ! ? , . ; : ( ) [ ] { } " ' - _ / \\
You are a helpful assistant. Hello, how are you today? I am fine, thank you very much.
"""


def tiny_configs() -> dict:
    """Demo name -> `TinyConfig`, gathered from every registered model file's `TINY_CONFIGS`
    (each family declares its own tiny checkpoints next to its model)."""
    import importlib

    from polymodal.llm_core.registry import model_modules

    found: dict = {}
    for module in model_modules():
        found.update(getattr(importlib.import_module(module), "TINY_CONFIGS", {}))
    return found


def __getattr__(name: str):
    if name == "ARCHITECTURES":  # computed on use: importing this module imports no model
        return list(tiny_configs())
    raise AttributeError(name)


def build_tokenizer(vocab_size: int = 480, tokens: dict | None = None, chat_template=None):
    """A byte-level BPE tokenizer trained on a built-in corpus, with the ChatML template (or
    `chat_template`); `tokens` adds a family's special tokens by role (see `TinyConfig`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tokens = dict(tokens or {})
    roles = {"eos_token": tokens.pop("eos_token", "<|im_end|>"), "pad_token": "<|endoftext|>"}
    if "bos_token" in tokens:
        roles["bos_token"] = tokens.pop("bos_token")
    new = [t for t in [*roles.values(), *tokens.values()] if t not in SPECIAL_TOKENS]
    tok.add_special_tokens(list(dict.fromkeys(new)))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **roles,
        extra_special_tokens=tokens or None,
        chat_template=chat_template or CHAT_TEMPLATE,
    )


def _hf_config(tiny, tokenizer, **overrides):
    """The transformers config of a tiny model whose token ids match `tokenizer`."""
    import transformers as tf

    names = [*SPECIAL_TOKENS, *tiny.tokens.values()]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
    kwargs = dict(
        TINY_TEXT,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token else ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    kwargs.update(tiny.config)
    if tiny.build is not None:
        cfg = tiny.build(kwargs, ids)
    else:
        cfg = getattr(tf, tiny.architecture).config_class(**kwargs)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_demo_checkpoint(
    out_dir: str | Path, arch: str = "qwen2_vl", seed: int = 0, dtype=torch.float32, **overrides
) -> Path:
    """Write a tiny random `arch` checkpoint (weights, tokenizer, processor) into `out_dir`."""
    import transformers as tf

    tinies = tiny_configs()
    if arch not in tinies:
        raise ValueError(f"unknown demo architecture {arch!r}; choose from {list(tinies)}")
    tiny = tinies[arch]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(tokens=tiny.tokens, chat_template=tiny.chat_template)
    cfg = _hf_config(tiny, tokenizer, **overrides)
    torch.manual_seed(seed)
    if tiny.make_model is not None:
        model = tiny.make_model(cfg, dtype)
    else:
        model = getattr(tf, tiny.architecture)._from_config(cfg, dtype=dtype)
    # Random init draws small weights; scale them up so logits differ between tokens and the
    # greedy path is not a string of ties (parity tests need a well-separated argmax).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.normal_(0.0, 0.5 / param.shape[-1] ** 0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if tiny.write_extra is not None:
        tiny.write_extra(out, tokenizer)
    return out
