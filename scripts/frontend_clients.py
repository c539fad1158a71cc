"""The load generator of `scripts/bench_frontend.py`: streamed chat-completion requests (a small
JPEG as a data: URL, or text only) sent at once over raw asyncio connections, one client
process per share of the burst; each stream's event times are recorded without parsing JSON,
so the clients cost little of the machine they share with the server.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

PROMPT = "Describe this image in detail."


class _Stream(asyncio.Protocol):
    """One streamed request on its own connection: times of the reads that carried events."""

    def __init__(self, request: bytes, done: asyncio.Future):
        self.request, self.done = request, done
        self.times: list[float] = []
        self.counts: list[int] = []
        self.tail = b""  # the last bytes, so that a marker split across reads still counts
        self.last = b""  # the end of the body (the usage event)
        self.head = b""
        self.sent = 0.0

    def connection_made(self, transport) -> None:
        self.connected = time.monotonic()
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self.head:
            self.head = data[:12]
        buf = self.tail + data
        n = buf.count(b"data: ")
        if n:
            self.times.append(now)
            self.counts.append(n)
        self.tail = buf[-5:]
        self.last = (self.last + data)[-4096:]
        if b"data: [DONE]" in self.last and not self.done.done():
            self.done.set_result(now)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _one(port: int, request: bytes) -> dict:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    sent = time.monotonic()
    _, proto = await loop.create_connection(lambda: _Stream(request, done), "127.0.0.1", port)
    finished = await done
    usage = re.search(rb'"completion_tokens":\s*(\d+)', proto.last)
    return {
        "ok": finished is not None and proto.head.startswith(b"HTTP/1.1 200"),
        "sent": sent,
        "connected": proto.connected,
        "done": finished or time.monotonic(),
        "times": proto.times,
        "counts": proto.counts,
        "tokens": int(usage.group(1)) if usage else 0,
    }


async def _burst(port: int, requests: list[bytes], start_at: float) -> list[dict]:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    return await asyncio.gather(*(_one(port, r) for r in requests))


def client_process(port: int, requests: list[bytes], start_at: float) -> list[dict]:
    """One client process: its share of the burst, all at `start_at` (monotonic clock)."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    return asyncio.run(_burst(port, requests, start_at))


def http_request(port: int, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def jpeg_data_url(i: int, size: int) -> str:
    """A small photo-like JPEG (noise over a colour), different for every `i`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def bodies(kind: str, n: int, tokens: int, image_size: int, salt: int) -> list[dict]:
    """The burst's request bodies: every prompt differs (no prefix or encoder cache hits)."""
    out = []
    for i in range(n):
        if kind == "image":
            url = jpeg_data_url(salt * 100003 + i, image_size)
            content = [{"type": "image_url", "image_url": {"url": url}},
                       {"type": "text", "text": PROMPT}]  # fmt: skip
        else:
            content = f"Request {salt}-{i}: write a long story about a fox and a dog."
        out.append({
            "model": "bench", "messages": [{"role": "user", "content": content}],
            "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
        })  # fmt: skip
    return out
