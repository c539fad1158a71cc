"""User mistakes raise a polymodal error that names the input (and leave the engine usable)."""

import json
import shutil

import pytest

from polymodal import InvalidInputError, ModelLoadError, ModelNotFoundError, UnsupportedModelError
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, "llama")


def _copy(ckpt, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    return out


def test_prompt_longer_than_max_model_len(ckpt):
    engine = Engine(str(ckpt), device="cpu", max_model_len=64, num_kv_blocks=16)
    with pytest.raises(InvalidInputError, match=r"prompt has 80 tokens but max_model_len is 64"):
        engine.add_request([7] * 80)
    rid = engine.add_request([7] * 10, SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(engine.run_until_done()[rid].outputs[0].token_ids) == 3  # still serving


def test_generation_stops_at_max_model_len(ckpt):
    engine = Engine(str(ckpt), device="cpu", max_model_len=32, num_kv_blocks=16)
    rid = engine.add_request([7] * 30, SamplingParams(max_tokens=50, ignore_eos=True))
    out = engine.run_until_done()[rid].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": -1}, "logprobs"),  # above max_logprobs: the engine refuses it
        ({"top_k": -5}, "top_k"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams(**kwargs)


def test_token_ids_outside_vocab(ckpt):
    engine = Engine(str(ckpt), device="cpu", num_kv_blocks=16)
    with pytest.raises(InvalidInputError, match="outside the vocab"):
        engine.add_request([1, 2, 10**6])


def test_unknown_architecture(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="FancyNewForCausalLM"):
        Engine(str(out), device="cpu")


def test_missing_weight_file(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        Engine(str(out), device="cpu")


def test_missing_tokenizer_files(tmp_path_factory, tmp_path):
    """Without them transformers builds an empty Qwen2 tokenizer and says nothing (Llama's
    fails to build, also a ModelLoadError)."""
    out = _copy(tiny_checkpoint(tmp_path_factory, "qwen2"), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        Engine(str(out), device="cpu")


@pytest.mark.parametrize(
    "knob, value, words",
    [
        ("max_model_len", 0, "max_model_len must be >= 1, got 0"),
        ("num_kv_blocks", -3, "num_kv_blocks must be >= 1, got -3"),
        ("max_num_seqs", 2.5, "max_num_seqs must be an integer, got 2.5"),
        ("block_size", 0, "block_size must be"),
        ("gpu_memory_utilization", 2.0, r"gpu_memory_utilization must be in \(0, 1\], got 2.0"),
        ("gpu_memory_utilization", 0.0, "gpu_memory_utilization must be in"),
        ("cpu_kv_cache_gb", -1.0, "cpu_kv_cache_gb must be positive"),
        ("tensor_parallel_size", 0, "tensor_parallel_size must be"),
    ],
)
def test_engine_sizes_out_of_range_are_refused(ckpt, knob, value, words):
    """0 is not read as "the default" (max_model_len=0 used to give the model's own length)."""
    with pytest.raises(InvalidInputError, match=words):
        Engine(str(ckpt), device="cpu", **{knob: value})


def test_truncated_safetensors(ckpt, tmp_path):
    out = _copy(ckpt, tmp_path)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        Engine(str(out), device="cpu")


def test_missing_and_misshaped_tensors(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    out = _copy(ckpt, tmp_path)
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, out / "model.safetensors")
    with pytest.raises(ModelLoadError, match="down_proj"):
        Engine(str(out), device="cpu")
    tensors[name] = tensors[name][:, :3].contiguous()
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"down_proj.*shape"):
        Engine(str(out), device="cpu")


def test_unknown_model_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model"):
        Engine("no-such-org/no-such-model", device="cpu")


def test_context_longer_than_the_kv_cache(ckpt, caplog):
    """By default the context is the model's own, shrunk with a warning to what the KV cache
    holds for one request; a `max_model_len` the user set that does not fit is an error."""
    import logging

    kw = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 8, "block_size": 4,
          "skip_tokenizer_init": True, "max_num_batched_tokens": 16}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="polymodal"):
        engine = Engine(str(ckpt), **kw)
    assert engine.max_model_len == 32  # 8 blocks of 4 tokens
    assert "not the model's own" in caplog.text and "raise num_kv_blocks" in caplog.text
    with pytest.raises(InvalidInputError, match="max_model_len=64 does not fit the KV cache"):
        Engine(str(ckpt), max_model_len=64, **kw)
    assert Engine(str(ckpt), max_model_len=32, **kw).max_model_len == 32
