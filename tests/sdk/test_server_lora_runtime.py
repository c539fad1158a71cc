"""Runtime LoRA updating (vLLM's `/v1/load_lora_adapter`, `/v1/unload_lora_adapter`, with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) on a real server: a loaded adapter is listed and runs
as `LLM` on its merged checkpoint; loading a name twice needs `load_inplace` (then the new
weights run); a bad adapter is a 400 and serves nothing; an unloaded name is a 404."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import openai_client, post, running_server
from tests.sdk.test_server_lora import PROMPTS, _greedy

pytest.importorskip("peft")
pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(300)


def _texts(client, model: str) -> list[str]:
    got = client.completions.create(
        model=model, prompt=PROMPTS, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    return [c.text for c in got.choices]


def test_load_and_unload_while_serving(tmp_path_factory, tmp_path, monkeypatch):
    from tests.llm_core.lora_adapters import make_adapters

    base = tiny_checkpoint(tmp_path_factory, "llama")
    adapters = make_adapters(base, tmp_path_factory.mktemp("runtime_lora"))
    want_all = _greedy(adapters["all"][1], PROMPTS)
    want_qv = _greedy(adapters["qv_down"][1], PROMPTS)
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    args = ["--dtype", "float32", "--num-kv-blocks", "64", "--enable-lora", "--max-loras", "2"]
    with running_server(base, tmp_path, *args) as url:
        client = openai_client(url)
        base_texts = _texts(client, "m")
        load = {"lora_name": "mine", "lora_path": str(adapters["all"][0])}
        assert post(url, "/v1/load_lora_adapter", load).status_code == 200
        assert [m.id for m in client.models.list().data] == ["m", "mine"]
        assert _texts(client, "mine") == want_all != base_texts
        again = post(url, "/v1/load_lora_adapter", load)
        assert again.status_code == 400 and "already been loaded" in again.text
        inplace = {"lora_name": "mine", "lora_path": str(adapters["qv_down"][0]),
                   "load_inplace": True}  # fmt: skip
        assert post(url, "/v1/load_lora_adapter", inplace).status_code == 200
        assert _texts(client, "mine") == want_qv
        bad = post(url, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/nope"})
        assert bad.status_code == 400 and "/nope" in bad.json()["error"]["message"]
        assert [m.id for m in client.models.list().data] == ["m", "mine"]
        taken = post(url, "/v1/load_lora_adapter", {"lora_name": "m", "lora_path": "/x"})
        assert taken.status_code == 400
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "mine"}).status_code == 200
        gone = post(url, "/v1/completions", {"model": "mine", "prompt": "x"})
        assert gone.status_code == 404
        assert post(url, "/v1/unload_lora_adapter", {"lora_name": "mine"}).status_code == 404
        assert _texts(client, "m") == base_texts  # the engine serves on
