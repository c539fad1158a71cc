"""The shipped architecture configs (`polymodal bench` names) build at their published sizes
(meta device: no weights), with their processors' token counts for a 448x448-class image."""

import importlib.util
from pathlib import Path

import pytest

from polymodal.bench import BUILTIN

ROOT = Path(__file__).resolve().parents[2]
SIZES = {  # bench name: (architecture, billions of parameters)
    "qwen2.5-vl-7b": ("Qwen2_5_VLForConditionalGeneration", 8.29),
    "gemma-3-12b": ("Gemma3ForCausalLM", 11.77),
    "gemma-3-12b-it": ("Gemma3ForConditionalGeneration", 12.19),
    "llava-next-7b": ("LlavaNextForConditionalGeneration", 7.57),
    "llava-onevision-7b": ("LlavaOnevisionForConditionalGeneration", 8.03),
    "pixtral-12b": ("LlavaForConditionalGeneration", 12.68),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", 30.53),
    "mixtral-8x7b": ("MixtralForCausalLM", 46.70),
    "deepseek-v3-reduced": ("DeepseekV3ForCausalLM", 25.45),
    "llama4-scout-reduced": ("Llama4ForConditionalGeneration", 20.56),
    "nvila-8b": ("LlavaLlamaModel", 8.09),
    # the model card: 3.2 B decoder + 0.43 B vision (our sizes give 3.24 + 0.44)
    "hyperclovax-seed-vision-3b": ("HCXVisionForCausalLM", 3.68),
    "llama-3.2-11b-vision": ("MllamaForConditionalGeneration", 10.67),
    "whisper-large-v3": ("WhisperForConditionalGeneration", 1.54),
    # base + towers; the two LoRA adapters' 0.83 B make the published 5.6 B (its README)
    "phi-4-multimodal": ("Phi4MMForCausalLM", 4.73),
}


def _memory():
    spec = importlib.util.spec_from_file_location("mm", ROOT / "scripts" / "model_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.memory


@pytest.mark.parametrize("name", sorted(SIZES))
def test_shipped_config_builds_at_its_size(name):
    assert set(SIZES) == set(BUILTIN)
    m = _memory()(str(BUILTIN[name]), 32768, "bfloat16")
    architecture, billions = SIZES[name]
    assert m["architecture"] == architecture
    assert m["params"] / 1e9 == pytest.approx(billions, abs=0.01)
