"""Server options in-process (FastAPI's test client over a real AsyncEngine): CORS,
--chat-template, several served names, "auto" tool choice without a parser, the CLI parsers,
--generation-config reaching the served sampling defaults."""

from __future__ import annotations

import argparse

import pytest

from polymodal.async_engine import AsyncEngine
from polymodal.feeder import PROCESS_WORKERS
from polymodal.server.cli import load_chat_template, parse_origins, serve_command
from tests.helpers import tiny_checkpoint

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from polymodal.server.app import create_app  # noqa: E402

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = AsyncEngine(
        str(tiny_checkpoint(tmp_path_factory, "qwen2")), separate_process=False, num_kv_blocks=128
    )
    yield eng
    eng.close()


def test_cors_preflight_succeeds_only_where_allowed(engine):
    app = create_app(engine, "m", api_key="k", allowed_origins=["https://app.example"])
    with TestClient(app) as client:
        preflight = {"Access-Control-Request-Method": "POST"}
        ok = client.options(
            "/v1/chat/completions", headers={"Origin": "https://app.example", **preflight}
        )
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        denied = client.options(
            "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
        )
        assert denied.status_code == 400
        assert "access-control-allow-origin" not in denied.headers
        error = denied.json()["error"]  # OpenAI-shaped, naming the origin
        assert error["param"] == "Origin" and "https://evil.example" in error["message"]
        assert "Disallowed CORS origin" in error["message"]
    with TestClient(create_app(engine, "m")) as client:  # no --allowed-origins: no CORS
        resp = client.options("/v1/chat/completions", headers={"Origin": "https://a.b"})
        assert resp.status_code == 405 and "error" in resp.json()


def test_chat_template_names_and_tool_choice_auto(engine):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    app = create_app(engine, ["m", "alias"], chat_template=template)
    with TestClient(app) as client:
        models = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["m", "alias"]
        tokens = client.post("/tokenize", json={"messages": USER}).json()["tokens"]
        text = engine.tokenizer.decode(tokens)
        assert text == "[user] Hi\n"
        per_request = "{{ messages[0]['content'] }}!"
        tokens = client.post("/tokenize", json={"messages": USER, "chat_template": per_request})
        assert engine.tokenizer.decode(tokens.json()["tokens"]) == "Hi!"
        body = {"model": "alias", "messages": USER, "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).json()["model"] == "alias"
        tools = [{"type": "function", "function": {"name": "f"}}]
        resp = client.post("/v1/chat/completions", json={**body, "tools": tools})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice"
        assert "--tool-call-parser" in resp.json()["error"]["message"]


def test_cli_parsers(tmp_path, capsys):
    assert parse_origins('["https://a", "https://b"]') == ["https://a", "https://b"]
    assert parse_origins("https://a, https://b") == ["https://a", "https://b"]
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}")
    assert load_chat_template(str(path)) == "{{ messages }}"
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    long = "{{ messages }}" + "x" * 400  # longer than a file name may be: still inline
    assert load_chat_template(long) == long
    with pytest.raises(SystemExit, match="no such file"):
        load_chat_template("missing.jinja")
    parser = argparse.ArgumentParser()
    serve_command(parser)
    args = parser.parse_args(["x", "--gpu-memory-utilization", "0.5", "--served-model-name", "a"])
    assert args.gpu_memory_utilization == 0.5 and args.served_model_name == ["a"]
    assert args.media_workers == PROCESS_WORKERS
    bad = argparse.ArgumentParser()
    run = serve_command(bad)
    assert run(bad.parse_args(["x", "--media-workers", "0"])) == 2  # before any model loads
    assert "--media-workers must be at least 1" in capsys.readouterr().err
    assert args.media_processes == 0  # off unless asked for
    assert run(bad.parse_args(["x", "--media-processes", "-1"])) == 2
    assert "--media-processes must be 0 or more" in capsys.readouterr().err


def test_unexpected_errors_are_openai_shaped_500s(engine, monkeypatch):
    app = create_app(engine, "m")

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(engine.tokenizer, "decode", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/detokenize", json={"tokens": [1, 2]})
    assert resp.status_code == 500
    assert "tokenizer exploded" in resp.json()["error"]["message"]


def test_generation_config_option_reaches_the_served_defaults(tmp_path_factory):
    import json
    import shutil

    ckpt = tmp_path_factory.mktemp("gen") / "model"
    shutil.copytree(tiny_checkpoint(tmp_path_factory, "qwen2"), ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "top_k": 1}))
    parser = argparse.ArgumentParser()
    serve_command(parser)
    for option, expected in (("auto", 1), ("vllm", None)):
        args = parser.parse_args([str(ckpt), "--generation-config", option])
        eng = AsyncEngine(args.model, generation_config=args.generation_config,
                          separate_process=False, num_kv_blocks=32)  # fmt: skip
        try:
            assert eng.model_info["default_sampling"].get("top_k") == expected
        finally:
            eng.close()


def test_response_role_token_ids_default_and_no_docs(engine):
    """vLLM's --response-role, --return-tokens-as-token-ids (a request may still say false),
    --disable-fastapi-docs."""
    app = create_app(engine, "m", response_role="bot", tokens_as_ids=True, api_docs=False)
    body = {"messages": USER, "max_tokens": 3, "temperature": 0, "logprobs": True}
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert reply["message"]["role"] == "bot"
        assert all(t["token"].startswith("token_id:") for t in reply["logprobs"]["content"])
        plain = {**body, "return_tokens_as_token_ids": False}
        reply = client.post("/v1/chat/completions", json=plain).json()["choices"][0]
        assert not any(t["token"].startswith("token_id:") for t in reply["logprobs"]["content"])
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True}).text
        assert '"role":"bot"' in streamed.replace(" ", "")
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
    with TestClient(create_app(engine, "m")) as client:
        assert client.get("/openapi.json").status_code == 200


def test_openapi_operation_ids_are_unique(engine):
    """Every route and method has its own OpenAPI operation id (client generators need it;
    FastAPI warns at a duplicate); /ping answers GET and POST."""
    import warnings

    with TestClient(create_app(engine, "m")) as client, warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = client.get("/openapi.json").json()
        ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
        assert len(ids) == len(set(ids)) and "/ping" in schema["paths"]
        assert client.get("/ping").status_code == client.post("/ping").status_code == 200
