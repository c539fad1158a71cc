"""`polymodal serve --enable-sleep-mode`: `POST /sleep`, `POST /wake_up`, `GET /is_sleeping`
(vLLM's routes) on a real server; a request while asleep is a 400; after waking, the same
completion as before."""

from __future__ import annotations

import pytest

from tests.sdk.server_process import API_KEY, tiny_server

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.timeout(300)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server(tmp_path_factory, "--enable-sleep-mode", "--num-kv-blocks", "64") as url:
        yield url


def _post(url, path, **kw):
    return httpx.post(f"{url}{path}", headers=HEADERS, timeout=60, **kw)


def _complete(url):
    body = {"model": "m", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
    return _post(url, "/v1/completions", json=body)


def _sleeping(url) -> bool:
    return httpx.get(f"{url}/is_sleeping", headers=HEADERS, timeout=60).json()["is_sleeping"]


def test_sleep_and_wake_up(server):
    before = _complete(server).json()["choices"][0]["text"]
    assert not _sleeping(server)
    assert _post(server, "/sleep", params={"level": 1}).status_code == 200
    assert _sleeping(server)
    refused = _complete(server)
    assert refused.status_code == 400 and "asleep" in refused.json()["error"]["message"]
    bad = _post(server, "/sleep", params={"level": 1})
    assert bad.status_code == 400 and "asleep already" in bad.json()["error"]["message"]
    assert _post(server, "/wake_up", params={"tags": "weights"}).status_code == 200
    assert _sleeping(server)  # the KV cache still sleeps
    assert _post(server, "/wake_up", params={"tags": "kv_cache"}).status_code == 200
    assert not _sleeping(server)
    assert _complete(server).json()["choices"][0]["text"] == before
    level = _post(server, "/sleep", params={"level": 5})
    assert level.status_code == 400 and "level must be 1 or 2" in level.json()["error"]["message"]


def test_routes_need_the_option_and_the_key(tmp_path_factory, server):
    assert httpx.post(f"{server}/sleep", timeout=60).status_code == 401
    with tiny_server(tmp_path_factory, "--num-kv-blocks", "32") as plain:
        assert _post(plain, "/sleep").status_code == 404
