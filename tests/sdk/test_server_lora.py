"""`polymodal serve --lora-modules name=path` as a real process, driven by the `openai` client:
the adapters are listed in /v1/models under the base model, a request's `model` picks its
adapter (equal to `LLM` on the checkpoint with that adapter merged into its weights), the base
name runs without one, and mistakes get OpenAI-shaped errors."""

from __future__ import annotations

import argparse

import pytest

from polymodal.engine_args import lora_modules
from polymodal.server.cli import serve_command
from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import openai_client, post, running_server

pytest.importorskip("peft")
pytest.importorskip("openai")

PROMPTS = [[5, 9, 33, 70, 11], [7, 7, 8, 21]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.llm_core.lora_adapters import make_adapters

    base = tiny_checkpoint(tmp_path_factory, "llama")
    adapters = make_adapters(base, tmp_path_factory.mktemp("server_lora"))
    return base, adapters


def _greedy(ckpt, prompts):
    from polymodal import LLM, SamplingParams

    llm = LLM(str(ckpt), device="cpu", dtype="float32", num_kv_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def test_lora_modules_served_by_name(setup, tmp_path):
    base, adapters = setup
    modules = [f"all={adapters['all'][0]}", f"qv={adapters['qv_down'][0]}"]
    args = ["--dtype", "float32", "--num-kv-blocks", "64", "--max-loras", "2",
            "--lora-modules", *modules]  # fmt: skip
    expected = {
        "all": _greedy(adapters["all"][1], PROMPTS),
        "qv": _greedy(adapters["qv_down"][1], PROMPTS),
        "m": _greedy(base, PROMPTS),
    }
    with running_server(base, tmp_path, *args) as url:
        client = openai_client(url)
        cards = {m.id: m for m in client.models.list().data}
        assert expected["all"] != expected["m"]  # the adapters change the output
        assert list(cards) == ["m", "all", "qv"]
        assert cards["all"].parent == "m" and cards["all"].root == str(adapters["all"][0])
        assert client.models.retrieve("qv").parent == "m"
        for name, want in expected.items():
            got = client.completions.create(
                model=name, prompt=PROMPTS, max_tokens=5, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert got.model == name and [c.text for c in got.choices] == want, name
        chat = client.chat.completions.create(
            model="qv", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert chat.model == "qv" and chat.usage.completion_tokens == 3
        missing = post(url, "/v1/completions", {"model": "nope", "prompt": "x"})
        assert missing.status_code == 404 and "'all', 'qv'" in missing.json()["error"]["message"]
        beam = post(url, "/v1/completions",
                    {"model": "all", "prompt": "x", "use_beam_search": True, "n": 2})  # fmt: skip
        assert beam.status_code == 400 and "LoRA" in beam.json()["error"]["message"]
        # runtime updating is off without VLLM_ALLOW_RUNTIME_LORA_UPDATING (vLLM's switch)
        runtime = post(url, "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "/x"})
        assert runtime.status_code == 404


def test_lora_modules_option_parsing(tmp_path):
    parser = argparse.ArgumentParser()
    serve_command(parser)
    args = parser.parse_args(["x", "--lora-modules", "a=/p/a", '{"name": "b", "path": "/p/b"}'])
    modules = lora_modules(args.lora_modules)
    assert [(m.lora_name, m.lora_int_id, m.lora_path) for m in modules.values()] == [
        ("a", 1, "/p/a"), ("b", 2, "/p/b")]  # fmt: skip
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        lora_modules(["nopath"])
    with pytest.raises(ValueError, match="'a' is given twice"):
        lora_modules(["a=/x", "a=/y"])
