"""`kv_cache_dtype="fp8"` on CPU (torch reference attention): twice the tokens of a 16-bit
cache (four times fp32's), logits near the 16-bit cache's, per-layer scales from the
checkpoint when it has them (else 1.0), and a clear error on a card without FP8."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.kv_memory import kv_cache_dtype
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits, tiny_checkpoint

PROMPT = [5, 17, 42, 99, 3, 250, 77, 13, 8, 31, 64, 128, 200, 11, 19, 23, 29]


def _run(path, steps=16, **kw):
    engine = Engine(str(path), dtype="float32", device="cpu", **kw)
    seen = record_logits(engine)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    engine.add_request(PROMPT, params, request_id="r")
    tokens = engine.run_until_done()["r"].outputs[0].token_ids
    return engine, tokens, [s[0] for s in seen]


def test_fp8_cache_holds_more_tokens_and_stays_close(tmp_path_factory, capsys):
    path = tiny_checkpoint(tmp_path_factory, "llama", head_dim=16)
    base, base_tokens, base_logits = _run(path, cpu_kv_cache_gb=0.001)
    engine, tokens, logits = _run(path, cpu_kv_cache_gb=0.001, kv_cache_dtype="fp8")
    caches = engine.runner.kv_caches
    assert caches[0].dtype == torch.float8_e4m3fn
    # same byte budget: 4x the blocks of an fp32 cache (2x those of a 16-bit one)
    assert caches[0].shape[1] == 4 * base.runner.kv_caches[0].shape[1]
    layers = engine.runner.model.attention_layers()
    assert all(layer.kv_scales == (1.0, 1.0) for layer in layers)  # no checkpoint scales
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(logits, base_logits))
    agree = sum(a == b for a, b in zip(tokens, base_tokens)) / len(tokens)
    with capsys.disabled():
        print(f"\nFP8 KV cache (tiny llama, scale 1.0): max relative logit error {rel:.4f}, "
              f"greedy agreement {agree:.0%}")  # fmt: skip
    assert rel < 0.1


def test_checkpoint_kv_scales_are_used(tmp_path_factory):
    """llm-compressor writes `self_attn.k_scale` / `v_scale` (ModelOpt `k_proj.k_scale`); with
    an FP8 cache each layer takes its own, without one they are ignored."""
    src = tiny_checkpoint(tmp_path_factory, "qwen2")
    out = tmp_path_factory.mktemp("kvscales")
    for f in src.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(0.25)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor([0.5])
    tensors["model.layers.1.self_attn.k_proj.k_scale"] = torch.tensor(2.0)
    save_file(tensors, out / "model.safetensors")
    engine, tokens, _ = _run(out, steps=4, kv_cache_dtype="fp8")
    layers = engine.runner.model.attention_layers()
    assert [layer.kv_scales for layer in layers] == [(0.25, 0.5), (2.0, 1.0)]
    engine, _, _ = _run(out, steps=4)  # a 16-bit cache: the scales load and go unused
    assert engine.runner.model.attention_layers()[0].kv_scales is None
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config


def test_kv_cache_dtype_errors(monkeypatch):
    with pytest.raises(InvalidInputError, match="kv_cache_dtype='int8'"):
        kv_cache_dtype("int8", torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(InvalidInputError, match=r"kv_cache_dtype='fp8'.*NVIDIA A100 has 8\.0"):
        kv_cache_dtype("fp8", torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kv_cache_dtype("fp8", torch.bfloat16, torch.device("cuda")) == torch.float8_e4m3fn
