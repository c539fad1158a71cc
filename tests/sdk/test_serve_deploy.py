"""Deployment options of `polymodal serve` as vLLM users pass them: `--config FILE` (YAML, the
command line wins), TLS (`--ssl-keyfile` / `--ssl-certfile`), `--root-path` behind a proxy."""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import subprocess
import sys
import time

import pytest

from polymodal.cli import build_parser
from polymodal.config_file import expand_config
from polymodal.server.cli import serve_command, uvicorn_options
from tests.helpers import tiny_checkpoint
from tests.sdk.server_process import API_KEY, free_port

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _parse(argv):
    parser, _ = build_parser("serve")
    return parser.parse_args(expand_config(argv, "serve", parser.options))


def test_config_file_options_and_the_command_line_wins(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "model: some/model\nmax_model_len: 4096\nmax-num-seqs: 8\nenable_prefix_caching: false\n"
        "enforce_eager: true\ntrust_remote_code: false\nserved_model_name: [a, b]\n"
        'limit_mm_per_prompt: {"image": 2}\nport: 9000\n'
    )
    args = _parse(["serve", "--config", str(config), "--port", "9100"])
    assert args.model == "some/model" and args.max_model_len == 4096 and args.max_num_seqs == 8
    assert args.enable_prefix_caching is False and args.enforce_eager is True
    assert args.trust_remote_code is False and args.served_model_name == ["a", "b"]
    assert args.limit_mm_per_prompt == {"image": 2} and args.port == 9100
    args = _parse(["serve", "--port", "1", "other/model", f"--config={config}",
                   "--max-model-len", "64"])  # fmt: skip
    assert args.model == "other/model" and args.max_model_len == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_option: 1\n")
    with pytest.raises(SystemExit):  # argparse names the unknown option
        _parse(["serve", "m", "--config", str(bad)])
    for text, words in (("- a list", "a mapping"), ("a: [", "not valid YAML")):
        bad.write_text(text)
        with pytest.raises(SystemExit, match=words):
            _parse(["serve", "m", "--config", str(bad)])
    with pytest.raises(SystemExit, match="no such file"):
        _parse(["serve", "m", "--config", str(tmp_path / "missing.yaml")])


def test_tls_options_are_checked_before_the_model_loads(tmp_path):
    parser = argparse.ArgumentParser()
    serve_command(parser)
    args = parser.parse_args(["m", "--ssl-keyfile", str(tmp_path / "k.pem")])
    with pytest.raises(SystemExit, match="no such file"):
        uvicorn_options(args)
    (tmp_path / "k.pem").write_text("x")
    with pytest.raises(SystemExit, match="go together"):
        uvicorn_options(args)
    args = parser.parse_args(["m", "--root-path", "/llm", "--disable-uvicorn-access-log"])
    assert uvicorn_options(args) == {"root_path": "/llm", "access_log": False}


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_server_under_a_root_path(tmp_path_factory, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    ckpt = tiny_checkpoint(tmp_path_factory, "qwen2")
    cmd = [sys.executable, "-m", "polymodal.cli", "serve", str(ckpt), "--port", str(port),
           "--api-key", API_KEY, "--num-kv-blocks", "32", "--ssl-keyfile", str(key),
           "--ssl-certfile", str(cert), "--root-path", "/llm",
           "--log-level", "warning"]  # fmt: skip
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(
            verify=ssl.create_default_context(cafile=str(cert)), timeout=10
        ) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.5)
            headers = {"Authorization": f"Bearer {API_KEY}"}
            models = client.get(f"{url}/v1/models", headers=headers).json()
            assert models["data"][0]["id"]
            # the API's own documents name the prefix the proxy serves it under
            assert client.get(f"{url}/openapi.json").json()["servers"] == [{"url": "/llm"}]
            with pytest.raises(httpx.TransportError):  # plain HTTP is not served
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
