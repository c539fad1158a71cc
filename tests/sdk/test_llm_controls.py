"""vLLM's engine calls on `LLM` and the server: `apply_model` hands the model to a function;
`start_profile` / `stop_profile` write a torch profiler trace of the work in between into
`VLLM_TORCH_PROFILER_DIR` (refused without it, or out of order), also as the server's
`POST /start_profile`, `/stop_profile`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polymodal import LLM, InvalidInputError, SamplingParams
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    return LLM(path, device="cpu", dtype="float32", num_kv_blocks=32)


def _events(path: str) -> list[str]:
    return [e.get("name", "") for e in json.loads(Path(path).read_text())["traceEvents"]]


def test_apply_model(llm):
    counts = llm.apply_model(lambda model: sum(p.numel() for p in model.parameters()))
    want = sum(p.numel() for p in llm.engine.runner.model.parameters())
    assert counts == [want] and want > 0
    layers = llm.apply_model(lambda model: type(model).__name__)
    assert layers == [type(llm.engine.runner.model).__name__]


def test_profile_trace(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR", raising=False)
    with pytest.raises(InvalidInputError, match="VLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path / "traces"))
    with pytest.raises(InvalidInputError, match="no profile is being recorded"):
        llm.stop_profile()
    llm.start_profile()
    with pytest.raises(InvalidInputError, match="already being recorded"):
        llm.start_profile()
    llm.generate("Hello there", SamplingParams(max_tokens=4))
    path = llm.stop_profile()
    assert Path(path).parent == tmp_path / "traces" and path.endswith(".pt.trace.json")
    assert any(name.startswith("aten::") for name in _events(path))  # the model's ops
    assert llm.generate("again", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_server_profile_routes(tmp_path_factory, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from tests.sdk.server_process import post, tiny_server

    with tiny_server(tmp_path_factory, "--num-kv-blocks", "32", arch="qwen2") as url:
        assert post(url, "/start_profile", {}).status_code == 404  # off without the variable
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path))
    with tiny_server(tmp_path_factory, "--num-kv-blocks", "32", arch="qwen2") as url:
        assert post(url, "/start_profile", {}).status_code == 200
        body = {"model": "m", "prompt": "Hello", "max_tokens": 3}
        assert post(url, "/v1/completions", body).status_code == 200
        stopped = post(url, "/stop_profile", {})
        assert stopped.status_code == 200
        assert any(n.startswith("aten::") for n in _events(stopped.json()["path"]))
        again = post(url, "/stop_profile", {})
        assert again.status_code == 400 and "start_profile" in again.json()["error"]["message"]
