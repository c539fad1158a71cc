"""VILA's prompt formats for checkpoints whose tokenizer has no chat template (VILA 1.5).

The public code picks a "conversation mode" by a substring of the model's path
(`CONVERSATION_MODE_MAPPING`) and formats one user turn and an open assistant turn with it;
NVILA's tokenizers carry a chat template (ChatML with "You are a helpful assistant"), which
wins. The modes below are VILA's `conversation.py` styles written as Jinja templates of the
same strings: `vicuna_v1` (separators " " and "</s>"), `llama_3` (VILA 1.5-8B's system prompt)
and `hermes-2` (VILA 1.5-40B). As there, a leading system message is dropped.
"""

from __future__ import annotations

_SKIP_SYSTEM = "{% for message in messages if message['role'] != 'system' %}"
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user\\'s questions."
)
_LLAMA3_SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nYou are a helpful "
    "language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
_HEADER = "<|start_header_id|>{}<|end_header_id|>\\n\\n"

CONVERSATION_TEMPLATES = {
    # SYSTEM " " USER ": " msg " " ASSISTANT ": " msg "</s>" ... ASSISTANT ":"
    "vicuna_v1": (
        "{{ '"
        + _VICUNA_SYSTEM
        + " ' }}"
        + _SKIP_SYSTEM
        + "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + message['content'] + '</s>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    # SYSTEM <|eot_id|> then header + msg + <|eot_id|> (<|end_of_text|> after a last turn)
    "llama_3": (
        "{{ '"
        + _LLAMA3_SYSTEM
        + "<|eot_id|>' }}"
        + _SKIP_SYSTEM
        + "{% if message['role'] == 'user' %}{{ '"
        + _HEADER.format("user")
        + "' }}"
        "{% else %}{{ '" + _HEADER.format("assistant") + "' }}{% endif %}"
        "{{ message['content'] }}{% if loop.last and not add_generation_prompt %}"
        "{{ '<|end_of_text|>' }}{% else %}{{ '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + _HEADER.format("assistant") + "' }}{% endif %}"
    ),
    # SYSTEM <|im_end|> then role + msg + <|im_end|> ..., the open assistant role last
    "hermes-2": (
        "{{ '<|im_start|>system\\nAnswer the questions.<|im_end|>' }}"
        + _SKIP_SYSTEM
        + "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
# substring of the checkpoint's path -> mode, as VILA's `CONVERSATION_MODE_MAPPING`
MODE_BY_NAME = {
    "nvila15b": "vicuna_v1",
    "vila1.5-3b": "vicuna_v1",
    "vila1.5-8b": "llama_3",
    "vila1.5-13b": "vicuna_v1",
    "vila1.5-40b": "hermes-2",
    "llama-3": "llama_3",
    "llama3": "llama_3",
}


def conversation_template(model_path: str) -> str:
    """The template of the first mode whose key is in `model_path` (lower-cased); VILA 1.5's
    `vicuna_v1` when none is."""
    name = str(model_path).lower()
    mode = next((m for key, m in MODE_BY_NAME.items() if key in name), "vicuna_v1")
    return CONVERSATION_TEMPLATES[mode]
