"""A text model's chat messages with OpenAI-style content lists: the text parts are joined one
per line before a plain-string chat template renders them (vLLM's "string" content format)."""

from polymodal import LLM
from tests.helpers import tiny_checkpoint


def test_text_parts_join_one_per_line(tmp_path_factory):
    llm = LLM(str(tiny_checkpoint(tmp_path_factory, "qwen2")), device="cpu", num_kv_blocks=32)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    as_list = llm.process([{"role": "user", "content": parts}])
    as_text = llm.process([{"role": "user", "content": "Hello\nworld"}])
    assert as_list.token_ids == as_text.token_ids
