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


def demo_vocab() -> tuple[list[str], list[tuple[str, str]]]:
    """The demo tokenizer's ordinary tokens (in id order; its special tokens, all `<|...|>`,
    left out) and merges: the text side of a full-size tokenizer."""
    from polymodal.demo_model import build_tokenizer

    small = json.loads(build_tokenizer()._tokenizer.to_str())["model"]
    ordinary = [t for t in sorted(small["vocab"], key=small["vocab"].get) if t[:2] != "<|"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in small["merges"]]
    return ordinary, merges


def byte_level_bpe(vocab: dict[str, int], merges: list, specials: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` over `vocab` with `specials` marked special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def build_qwen_tokenizer(first_special_id: int = QWEN_FIRST_SPECIAL_ID):
    """A byte-level BPE tokenizer whose special tokens sit at Qwen's ids (ChatML template)."""
    from transformers import PreTrainedTokenizerFast

    from polymodal.demo_model import CHAT_TEMPLATE

    ordinary, merges = demo_vocab()
    vocab = {tok: i for i, tok in enumerate(ordinary)}
    filler = 0
    while len(vocab) < first_special_id:  # never produced by a merge: ids to fill the range
        vocab[f"\u0120w{filler}"] = len(vocab)
        filler += 1
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(vocab, merges, QWEN_SPECIAL_TOKENS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tokenizer_at(vocab_size: int, roles: dict, template: str, ids: dict):
    """A byte-level BPE of `vocab_size` ids: the demo tokenizer's merges, `ids`' special tokens
    at their ids, the family's other special tokens (`roles`: role -> token) just below the
    top, unused filler tokens everywhere else (never produced by a merge). A shipped config
    has no tokenizer; this one puts the tokens its config names at the ids it names."""
    from transformers import PreTrainedTokenizerFast

    ordinary, merges = demo_vocab()
    roles = dict(roles)
    named = {r: roles.pop(r) for r in ("bos_token", "eos_token") if r in roles}
    specials = list(dict.fromkeys([*named.values(), *roles.values(), *ids, "<pad>"]))
    placed = dict(ids)
    free = (i for i in range(vocab_size - 1, -1, -1) if i not in ids.values())
    for token in specials:
        if token not in placed:
            placed[token] = next(free)
    by_id = {i: t for t, i in placed.items()}
    vocab, words = {}, iter(ordinary)
    for i in range(vocab_size):
        vocab[by_id.get(i) or next(words, None) or f"\u0120w{i}"] = i
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(vocab, merges, specials),
        pad_token="<pad>",
        **named,
        extra_special_tokens=roles or None,
        chat_template=template,
    )


def copy_configs(config_dir: Path, out: Path) -> None:
    """`config_dir`'s JSON files into `out`, config.json stamped with the installed
    transformers' version where it names none (as `save_pretrained` writes it): without one,
    transformers takes a local checkpoint for an old Mistral one and warns about its
    tokenizer's regex at every load."""
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    for path in config_dir.glob("*.json"):
        shutil.copy(path, out / path.name)
    config = json.loads((out / "config.json").read_text())
    if "transformers_version" not in config:
        config["transformers_version"] = transformers.__version__
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_user_checkpoint(config_dir: str | Path, out_dir: str | Path) -> Path:
    """`config_dir`'s config and processor files plus a Qwen-id tokenizer, in `out_dir`."""
    config_dir, out = Path(config_dir), Path(out_dir)
    config = json.loads((config_dir / "config.json").read_text())
    if config.get("model_type") == "llava_llama":
        return write_vila_checkpoint(config_dir, out)
    if config.get("model_type") not in ("qwen2_vl", "qwen2_5_vl", "qwen2"):
        raise ValueError(f"{config_dir}: a user-path checkpoint is built for Qwen families only")
    copy_configs(config_dir, out)
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


def whisper_special_ids(generation: dict, vocab_size: int) -> dict[str, int]:
    """Whisper's special tokens at the ids its generation_config.json names: end of text,
    start of transcript, the languages, the tasks, `<|startoflm|>` / `<|startofprev|>`,
    `<|nospeech|>` / `<|notimestamps|>`, then the timestamps `<|0.00|>` ... to the vocab's end."""
    no_timestamps, prev = generation["no_timestamps_token_id"], generation["prev_sot_token_id"]
    ids = {
        "<|endoftext|>": generation["eos_token_id"],
        "<|startoftranscript|>": generation["decoder_start_token_id"],
        **generation["lang_to_id"],
        **{f"<|{task}|>": i for task, i in generation["task_to_id"].items()},
        "<|startoflm|>": prev - 1,
        "<|startofprev|>": prev,
        "<|nospeech|>": no_timestamps - 1,
        "<|notimestamps|>": no_timestamps,
    }
    for i in range(vocab_size - no_timestamps - 1):
        ids[f"<|{i * 0.02:.2f}|>"] = no_timestamps + 1 + i
    return ids


def write_whisper_checkpoint(config_dir: str | Path, out_dir: str | Path) -> Path:
    """A Whisper config dir (config.json, preprocessor_config.json, generation_config.json)
    copied into `out_dir` with a tokenizer of `vocab_size` ids holding Whisper's special tokens
    where generation_config.json puts them."""
    config_dir, out = Path(config_dir), Path(out_dir)
    copy_configs(config_dir, out)
    generation = json.loads((config_dir / "generation_config.json").read_text())
    vocab = json.loads((config_dir / "config.json").read_text())["vocab_size"]
    roles = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
    ids = whisper_special_ids(generation, vocab)
    build_tokenizer_at(vocab, roles, None, ids).save_pretrained(out)
    return out


# Phi-4-multimodal's tokenizer (o200k + Phi's specials): the slot and chat-role tokens at the
# hub tokenizer's ids (its image / audio slots are named <|endoftext10|> / <|endoftext11|>
# there, <|image|> / <|audio|> in transformers' files)
PHI4_IDS = {
    "<|endoftext|>": 199999,
    "<|image|>": 200010,
    "<|audio|>": 200011,
    "<|assistant|>": 200019,
    "<|end|>": 200020,
    "<|user|>": 200021,
}


def write_phi4mm_checkpoint(config_dir: str | Path, out_dir: str | Path) -> Path:
    """A Phi-4-multimodal config dir (the hub's layout, as `sdk/configs/phi_4_multimodal`, or
    transformers') as a transformers-layout checkpoint without weights in `out_dir`: its
    config.json converted (`Phi4MMConfig`), transformers' processor files (at most the config
    dir's `dynamic_hd` crops an image) and a tokenizer of `vocab_size` ids with `PHI4_IDS`.
    The LoRA adapters come with the weights (`bench/phi4mm.py`)."""
    import transformers as tf

    from polymodal.llm_core.models.phi4mm_hub import Phi4MMConfig
    from polymodal.llm_core.models.phi4mm_tiny import PHI4_TEMPLATE, PHI4_TOKENS

    config_dir, out = Path(config_dir), Path(out_dir)
    config = Phi4MMConfig.from_pretrained(config_dir)
    config.architectures = ["Phi4MultimodalForCausalLM"]
    slots = {"<|image|>": config.vision_config.image_token_id,
             "<|audio|>": config.audio_config.audio_token_id}  # fmt: skip
    if any(PHI4_IDS[token] != i for token, i in slots.items()):
        raise ValueError(f"{config_dir}: slot token ids {slots}, the tokenizer has {PHI4_IDS}")
    config.save_pretrained(out)
    tokenizer = build_tokenizer_at(config.vocab_size, PHI4_TOKENS, PHI4_TEMPLATE, PHI4_IDS)
    hd = json.loads((config_dir / "preprocessor_config.json").read_text()).get("dynamic_hd", 36)
    tf.Phi4MultimodalProcessor(
        image_processor=tf.Phi4MultimodalImageProcessor(dynamic_hd=hd),
        audio_processor=tf.Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer,
        chat_template=PHI4_TEMPLATE,
    ).save_pretrained(out)
    return out
