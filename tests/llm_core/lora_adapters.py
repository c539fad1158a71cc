"""Test adapters made offline with `peft` on a tiny checkpoint, and each adapter merged into
the weights (`merge_and_unload`): the reference a LoRA request must equal."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (rank, lora_alpha, target modules, rsLoRA)
ADAPTERS = {
    "all": (8, 16, ALL_LINEAR, False),
    "qv_down": (4, 8, ["q_proj", "v_proj", "down_proj"], False),
    "rslora_mlp": (16, 4, ["gate_proj", "up_proj", "o_proj"], True),
}


def make_adapters(base: Path, root: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (PEFT adapter dir, merged checkpoint dir), B initialised randomly (PEFT's
    default zero B would make every adapter a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    made = {}
    for seed, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
            init_lora_weights=False,
        )  # fmt: skip
        peft_model = get_peft_model(model, config)
        adapter_dir, merged_dir = root / name, root / f"{name}_merged"
        peft_model.save_pretrained(adapter_dir)
        peft_model.merge_and_unload().save_pretrained(merged_dir)
        for file in base.iterdir():  # tokenizer, template, generation config
            if not (merged_dir / file.name).exists():
                shutil.copy(file, merged_dir / file.name)
        made[name] = (adapter_dir, merged_dir)
    return made
