"""Quantized checkpoints and settings a user can get wrong: each error names the setting, the
scheme or the tensor (and the card, for FP8 on one without it)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.quantization import resolve_quantization
from tests.helpers import tiny_checkpoint
from tests.llm_core.quant_checkpoints import write_fp8_checkpoint, write_int4_checkpoint


def _engine(path, **kw):
    return Engine(str(path), dtype="float32", device="cpu", num_kv_blocks=16, **kw)


def _edit(path, change_tensors=None, change_config=None):
    if change_tensors is not None:
        tensors = load_file(path / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, path / "model.safetensors")
    if change_config is not None:
        config = json.loads((path / "config.json").read_text())
        change_config(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))


def test_scheme_errors():
    with pytest.raises(InvalidInputError, match="quantization='int3' is not supported"):
        resolve_quantization(None, "int3")
    with pytest.raises(ModelLoadError, match="quant_method 'bitsandbytes' is not supported"):
        resolve_quantization({"quant_method": "bitsandbytes"}, where="cfg")
    with pytest.raises(InvalidInputError, match="quantization='awq' needs a checkpoint"):
        resolve_quantization(None, "awq")
    with pytest.raises(InvalidInputError, match="does not match the checkpoint.*'gptq'"):
        resolve_quantization({"quant_method": "gptq", "bits": 4}, "awq")
    with pytest.raises(ModelLoadError, match="AWQ version 'gemv'"):
        resolve_quantization({"quant_method": "awq", "version": "gemv"})
    with pytest.raises(ModelLoadError, match="8-bit weights"):
        resolve_quantization({"quant_method": "gptq", "bits": 8})
    with pytest.raises(ModelLoadError, match="format 'pack-quantized'"):
        resolve_quantization({"quant_method": "compressed-tensors", "format": "pack-quantized"})
    assert resolve_quantization(None) is None
    assert resolve_quantization(None, "awq", dummy_weights=True).name == "awq"
    assert resolve_quantization({"quant_method": "awq_marlin"}).name == "awq"  # vLLM's alias


def test_fp8_on_a_card_without_fp8(monkeypatch):
    scheme = resolve_quantization(None, "fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(InvalidInputError, match=r"quantization='fp8'.*NVIDIA A10 has 8\.6"):
        scheme.check_device(torch.device("cuda"))
    resolve_quantization(None, "awq", True).check_device(torch.device("cuda"))  # INT4: any card


def test_llm_keyword_and_cli_option():
    """`LLM(quantization=..., kv_cache_dtype=...)` reach EngineConfig; `--quantization` and
    `--kv-cache-dtype` are engine options of serve / demo / caption."""
    import argparse

    from polymodal.engine_args import add_engine_arguments, engine_kwargs
    from polymodal.llm_options import engine_config_kwargs

    assert engine_config_kwargs("m", {"quantization": "fp8", "kv_cache_dtype": "fp8"}) == {
        "quantization": "fp8",
        "kv_cache_dtype": "fp8",
    }
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--quantization", "awq", "--kv-cache-dtype", "fp8"])
    kwargs = engine_kwargs(args)
    assert kwargs["quantization"] == "awq" and kwargs["kv_cache_dtype"] == "fp8"
    assert "quantization" not in engine_kwargs(parser.parse_args([]))


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory):
    src = tiny_checkpoint(tmp_path_factory, "llama")
    return src, tmp_path_factory


def _fresh_awq(awq_dir, name):
    src, factory = awq_dir
    path, _ = write_int4_checkpoint(src, factory.mktemp(name) / "q", "awq", group_size=32)
    return path


def test_missing_scales_name_the_tensor(awq_dir):
    path = _fresh_awq(awq_dir, "missing")
    _edit(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.scales"))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.self_attn\.qkv_proj\.scales.*'k'"):
        _engine(path)


def test_misshaped_scales_name_the_tensor(awq_dir):
    path = _fresh_awq(awq_dir, "shape")
    name = "model.layers.0.mlp.down_proj.scales"
    _edit(path, lambda t: t.__setitem__(name, t[name][:1]))
    with pytest.raises(ModelLoadError, match=rf"{name}.*does not fit"):
        _engine(path)


def test_group_size_that_does_not_fit(awq_dir):
    path = _fresh_awq(awq_dir, "group")
    _edit(path, change_config=lambda qc: qc.__setitem__("group_size", 48))
    with pytest.raises(ModelLoadError, match="group size 48"):
        _engine(path)


def test_unknown_quant_method_in_checkpoint(awq_dir):
    path = _fresh_awq(awq_dir, "method")
    _edit(path, change_config=lambda qc: qc.__setitem__("quant_method", "hqq"))
    with pytest.raises(ModelLoadError, match="quant_method 'hqq' is not supported"):
        _engine(path)


def test_gptq_act_order_shards_must_agree(awq_dir):
    """q/k/v (one input) share GPTQ's act order; a checkpoint where they differ cannot fuse."""
    src, factory = awq_dir
    path, _ = write_int4_checkpoint(src, factory.mktemp("gidx") / "q", "gptq", 32, desc_act=True)
    name = "model.layers.0.self_attn.k_proj.g_idx"
    _edit(path, lambda t: t.__setitem__(name, t[name].flip(0).contiguous()))
    with pytest.raises(ModelLoadError, match=r"layers\.0\.self_attn\.[qkv]_proj\.g_idx.*differs"):
        _engine(path)


def test_fp8_missing_and_misshaped_scale(tmp_path_factory):
    src = tiny_checkpoint(tmp_path_factory, "llama", head_dim=16)
    path = write_fp8_checkpoint(src, tmp_path_factory.mktemp("fp8") / "q", "compressed-tensors")
    name = "model.layers.0.self_attn.o_proj.weight_scale"
    saved = load_file(path / "model.safetensors")[name]
    _edit(path, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=r"layers\.0\.self_attn\.o_proj\.weight_scale"):
        _engine(path)
    _edit(path, lambda t: t.__setitem__(name, saved[:3].contiguous()))
    with pytest.raises(ModelLoadError, match=rf"{name}.*does not fit"):
        _engine(path)


def test_bench_quantization_options():
    """`polymodal bench --quantization fp8|awq|gptq --kv-cache-dtype fp8` parse (the engine
    workload builds our side with dummy weights quantized on load)."""
    import argparse

    from polymodal.bench import bench_command

    parser = argparse.ArgumentParser()
    bench_command(parser)
    args = parser.parse_args(["--quantization", "awq", "--kv-cache-dtype", "fp8"])
    assert args.quantization == "awq" and args.kv_cache_dtype == "fp8"
    assert parser.parse_args([]).quantization is None
