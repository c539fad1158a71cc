"""Start `polymodal serve` as a real process for a test module; clients for it."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

API_KEY = "test-key"


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_data_url(width: int = 48, height: int = 40, color=(200, 30, 60)) -> str:
    """A solid-color PNG as a data: URL."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def tiny_server(tmp_path_factory, *args: str, arch: str = "qwen2_vl"):
    """`running_server` of the tiny `arch` checkpoint, its log in a fresh folder."""
    from tests.helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path_factory, arch)
    return running_server(ckpt, tmp_path_factory.mktemp("log"), *args)


@contextlib.contextmanager
def running_server(ckpt, log_dir, *args: str):
    """Base URL of `polymodal serve ckpt --served-model-name m --api-key ... *args`."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "polymodal.cli", "serve", str(ckpt), "--port", str(port)]
    cmd += ["--served-model-name", "m", "--api-key", API_KEY, "--log-level", "warning", *args]
    log = log_dir / "server.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def openai_client(url: str):
    """The official openai client for the server."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    """POST JSON with the API key."""
    headers = {"Authorization": f"Bearer {API_KEY}", **kw.pop("headers", {})}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=120, **kw)
