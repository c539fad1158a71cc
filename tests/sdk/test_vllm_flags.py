"""vLLM's command-line options a launch script carries: those polymodal takes with no effect
parse and are logged (on stderr by default), those it takes at vLLM's default only refuse other
values naming the option, `--num-gpu-blocks-override` sizes the KV pool; the server's
`--enable-log-requests` / `--max-log-len`, CORS methods and headers, and the engine in the
server's own process (`--disable-frontend-multiprocessing`)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from polymodal import LLM, InvalidInputError
from polymodal.engine_args import engine_kwargs
from tests.helpers import tiny_checkpoint

pytest.importorskip("fastapi")
from polymodal.server.cli import option_error, serve_command  # noqa: E402


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command(parser)
    return parser.parse_args(list(argv))


def test_no_effect_and_default_only_options(tmp_path_factory):
    ckpt = str(tiny_checkpoint(tmp_path_factory, "qwen2"))
    args = _parse(ckpt, "--swap-space", "4", "--max-seq-len-to-capture", "8192",
                  "--cpu-offload-gb", "0", "--tokenizer-mode", "auto", "--async-scheduling",
                  "--pipeline-parallel-size", "1", "--compilation-config", '{"level": 3}',
                  "--cuda-graph-sizes", "8", "16", "--num-gpu-blocks-override", "48",
                  "--device", "cpu")  # fmt: skip
    kwargs = engine_kwargs(args)
    assert kwargs["cuda_graph_sizes"] == [8, 16] and kwargs["num_kv_blocks"] == 48
    assert kwargs["async_scheduling"] is True  # an engine knob of polymodal's too
    code = (
        "import sys; from polymodal import LLM; "
        f"llm = LLM({ckpt!r}, **{kwargs!r}); print(llm.engine.scheduler.kv.num_usable_blocks)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LLM(swap_space=4.0) has no effect" in run.stderr  # logged by default, on stderr
    assert "compilation_config={'level': 3}) has no effect" in run.stderr
    assert int(run.stdout.split()[-1]) <= 48
    for flag, value in [("--tokenizer-mode", "slow"), ("--pipeline-parallel-size", "2"),
                        ("--model-impl", "transformers")]:  # fmt: skip
        refused = engine_kwargs(_parse(ckpt, flag, value, "--device", "cpu"))
        with pytest.raises(InvalidInputError, match=flag.lstrip("-").replace("-", "_")):
            LLM(ckpt, **refused)


def test_server_options_checked():
    assert option_error(_parse("m")) is None
    cases = {
        ("--chat-template-content-format", "string"): "only auto",
        ("--api-server-count", "2"): "only 1",
        ("--disable-frontend-multiprocessing", "--data-parallel-size", "2"): "not with",
    }
    for argv, words in cases.items():
        assert words in option_error(_parse("m", *argv))


def test_request_log_cors_and_engine_in_process(tmp_path_factory, tmp_path):
    import httpx

    from tests.sdk.server_process import post, running_server

    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2")
    args = ("--num-kv-blocks", "32", "--enable-log-requests", "--max-log-len", "12",
            "--disable-frontend-multiprocessing", "--allowed-origins", '["http://app"]',
            "--allowed-methods", '["POST"]', "--allowed-headers", '["Authorization"]')  # fmt: skip
    with running_server(ckpt, tmp_path, *args) as url:
        body = {"model": "m", "prompt": "a long prompt that the log cuts", "max_tokens": 2}
        assert post(url, "/v1/completions", body).status_code == 200
        chat = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        assert post(url, "/v1/chat/completions", chat).status_code == 200

        def preflight(method: str, header: str = "Authorization") -> int:
            return httpx.options(f"{url}/v1/models", timeout=30, headers={
                "Origin": "http://app", "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": header}).status_code  # fmt: skip

        assert preflight("POST") == 200
        assert preflight("DELETE") == 400 and preflight("POST", "X-Other") == 400
    log = (tmp_path / "server.log").read_text()
    assert "Received request" in log and "prompt: a long promp..." in log
    assert "user: hi" in log  # a conversation logged as its text
