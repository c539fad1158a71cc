"""Fixtures: tiny Qwen2-VL / Qwen2.5-VL checkpoints and their HF vision towers (fp32, CPU)."""

import pytest
import torch


@pytest.fixture(scope="session")
def vl_checkpoint(tmp_path_factory):
    """`vl_checkpoint(arch)` -> directory of a tiny random checkpoint, written once per arch."""
    from polymodal.demo_model import write_demo_checkpoint

    written = {}

    def get(arch: str):
        if arch not in written:
            written[arch] = write_demo_checkpoint(tmp_path_factory.mktemp(arch), arch)
        return written[arch]

    return get


@pytest.fixture(scope="session")
def hf_visual(vl_checkpoint):
    """`hf_visual(arch)` -> transformers' vision tower of the tiny checkpoint (eval, fp32)."""
    import transformers as tf

    classes = {
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
    }
    loaded = {}

    def get(arch: str):
        if arch not in loaded:
            model = classes[arch].from_pretrained(vl_checkpoint(arch), dtype=torch.float32)
            loaded[arch] = model.model.visual.eval()
        return loaded[arch]

    return get


@pytest.fixture(scope="session")
def random_pixels():
    """`random_pixels(grid)` -> (pixel_values `[num_patches, 3*2*14*14]`, grid_thw int)."""

    def make(grid: list[list[int]], seed: int = 0):
        grid_thw = torch.tensor(grid)
        num_patches = int(grid_thw.prod(-1).sum())
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(num_patches, 3 * 2 * 14 * 14, generator=gen), grid_thw

    return make


@pytest.fixture(scope="session")
def hf_embeddings(hf_visual):
    """`hf_embeddings(arch, pixel_values, grid_thw)` -> HF's merged embeddings
    `[num_slots, out_hidden]` (v5 returns a ModelOutput whose pooler_output holds them)."""

    def run(arch: str, pixel_values, grid_thw):
        with torch.no_grad():
            out = hf_visual(arch)(pixel_values, grid_thw=grid_thw)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    return run
