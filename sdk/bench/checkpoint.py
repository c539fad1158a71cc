"""A full-size checkpoint directory for benches of the user paths, built offline.

`Pipeline`, `polymodal caption` and the server load a model the way a user's checkpoint is laid
out: config, tokenizer with its chat template, processor config. A shipped architecture config
(`sdk/configs/*`) has none of the text side, so `write_user_checkpoint` adds a tokenizer with
the real vocabulary size and Qwen's special-token ids (a small byte-level BPE padded with
filler tokens up to the first special id) and the ChatML template. Weights are not written:
the engines run with `load_format="dummy"` (random weights from config.json).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Qwen2 / Qwen2.5(-VL) special tokens, from id 151643 on, in the order Qwen's tokenizer has them.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_FIRST_SPECIAL_ID = 151643


def build_qwen_tokenizer(first_special_id: int = QWEN_FIRST_SPECIAL_ID):
    """A byte-level BPE tokenizer whose special tokens sit at Qwen's ids (ChatML template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from polymodal.demo_model import CHAT_TEMPLATE, build_tokenizer

    small = json.loads(build_tokenizer()._tokenizer.to_str())["model"]
    vocab = {tok: i for tok, i in small["vocab"].items() if not tok.startswith("<|")}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in small["merges"]]
    vocab = {tok: i for i, tok in enumerate(sorted(vocab, key=vocab.get))}
    filler = 0
    while len(vocab) < first_special_id:  # never produced by a merge: ids to fill the range
        vocab[f"\u0120w{filler}"] = len(vocab)
        filler += 1
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(QWEN_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def write_user_checkpoint(config_dir: str | Path, out_dir: str | Path) -> Path:
    """`config_dir`'s config and processor files plus a Qwen-id tokenizer, in `out_dir`."""
    config_dir, out = Path(config_dir), Path(out_dir)
    config = json.loads((config_dir / "config.json").read_text())
    if config.get("model_type") == "llava_llama":
        return write_vila_checkpoint(config_dir, out)
    if config.get("model_type") not in ("qwen2_vl", "qwen2_5_vl", "qwen2"):
        raise ValueError(f"{config_dir}: a user-path checkpoint is built for Qwen families only")
    out.mkdir(parents=True, exist_ok=True)
    for path in config_dir.glob("*.json"):
        shutil.copy(path, out / path.name)
    tokenizer = build_qwen_tokenizer()
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "eos_token_id"):
        token = tokenizer.convert_ids_to_tokens(config[name]) if name in config else None
        if name in config and not (token or "").startswith("<|"):
            raise ValueError(f"{config_dir}: {name}={config[name]} is not a special token id")
    tokenizer.save_pretrained(out)
    return out


# VILA's media tokens, after Qwen2's own specials (NVILA's tokenizer has them at 151648-151650)
VILA_TOKENS = ["<vila/sentinel>", "<image>", "<vila/video>"]


def write_vila_checkpoint(config_dir: Path, out: Path) -> Path:
    """A VILA / NVILA config dir (Qwen2 decoder) in the hub's layout: config.json and
    `vision_tower/`'s processor config copied, the Qwen-id tokenizer with VILA's media tokens
    and NVILA's chat template in `llm/`."""
    from polymodal.llm_core.models.vila_tiny import QWEN2_TEMPLATE

    config = json.loads((config_dir / "config.json").read_text())
    if (config.get("llm_cfg") or {}).get("model_type") != "qwen2":
        raise ValueError(f"{config_dir}: a user-path VILA checkpoint is built for Qwen2 only")
    shutil.copytree(config_dir, out, dirs_exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": VILA_TOKENS})
    tokenizer.chat_template = QWEN2_TEMPLATE
    tokenizer.save_pretrained(out / "llm")
    return out


def has_tokenizer(model_dir: str | Path) -> bool:
    """Whether `model_dir` already holds a tokenizer (a real checkpoint)."""
    model_dir = Path(model_dir)
    return any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
