"""`polymodal bench TEXT-MODEL` runs the text-decode bench (bench/text.py): the shipped text-only
configs route to it (the engine workload's prompts are Qwen-VL's), the VL and speech families
to theirs; its table prints what it measured (the run itself needs a GPU:
tests/sdk/test_bench_gpu.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from polymodal.bench import BUILTIN, family_bench, resolve_bench_model

ROUTES = {
    "qwen2.5-vl-7b": None,  # the engine workload
    "gemma-3-12b": "polymodal.bench.text",
    "qwen3-30b-a3b": "polymodal.bench.text",
    "mixtral-8x7b": "polymodal.bench.text",
    "deepseek-v3-reduced": "polymodal.bench.text",
    "gemma-3-12b-it": "polymodal.bench.vl",
    "llava-next-7b": "polymodal.bench.vl",
    "whisper-large-v3": "polymodal.bench.whisper",
    "nvila-8b": "polymodal.bench.vila",
}


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_shipped_configs_route_to_their_bench(name):
    assert name in BUILTIN
    assert family_bench(resolve_bench_model(name)) == ROUTES[name]


def test_a_text_checkpoint_folder_routes_to_the_text_bench(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert family_bench(tmp_path) == "polymodal.bench.text"
    (tmp_path / "config.json").write_text(
        '{"architectures": ["FooForCausalLM"], "vision_config": {}}'
    )
    assert family_bench(tmp_path) is None


def test_print_table(capsys):
    text = importlib.import_module("polymodal.bench.text")
    assert set(text.DEFAULTS) == {"images", "hf_images", "hf_batch"}
    row = {"card": "NVIDIA H100", "date": "2026-12-05", "model": "gemma-3-12b",
           "hbm_copy_tb_s": 3.0, "decode_ms": 8.679, "decode_floor_ms": 7.839,
           "decode_of_floor": 7.839 / 8.679, "prompts": 64, "output_tokens": 64,
           "tokens_s": 5262.6, "hf_tokens_s": 500.0, "speedup": 10.5}  # fmt: skip
    text.print_table(row)
    out = capsys.readouterr().out
    assert "8.679 ms a token" in out and "90.3% of the floor" in out and "(10.5x)" in out


def test_the_script_keeps_the_device_scripts_helpers():
    sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
    try:
        script = importlib.import_module("bench_text_decode")
    finally:
        sys.path.pop(0)
    for name in ("variant_ms", "decode_ms", "throughput", "run_bench", "main"):
        assert callable(getattr(script, name))


def test_a_freed_bench_engine_is_collected(tmp_path_factory):
    """A/B runs build one engine after another in one process: `OurSide.free` must leave no
    reference to the engine (the heap frozen at build hid its cycles from the collector, and a
    caller's local kept it alive: the next engine found no memory for its KV cache)."""
    import gc
    import weakref

    from polymodal.bench.workloads import OurSide
    from tests.helpers import tiny_checkpoint

    path = tiny_checkpoint(tmp_path_factory, "qwen2_5_vl")
    ours = OurSide(path, dummy_weights=True, max_model_len=512, prefix_caching=True)
    engine = weakref.ref(ours.engine)
    gc.disable()  # collected by `free` itself, not by a later automatic pass
    try:
        ours.free()
        assert engine() is None
    finally:
        gc.enable()
