import json

import pytest
import transformers as tf

from polymodal.demo_model import ARCHITECTURES, write_demo_checkpoint


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_demo_checkpoint_loads_in_transformers(tmp_path, arch):
    out = write_demo_checkpoint(tmp_path / arch, arch)
    tok = tf.AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    cfg = json.loads((out / "config.json").read_text())
    vocab = cfg.get("text_config", cfg)["vocab_size"]
    assert vocab == len(tok)
    assert arch in ARCHITECTURES
