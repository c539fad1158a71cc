"""`polymodal run-batch -i requests.jsonl -o results.jsonl --model M`: OpenAI's (and vLLM's)
batch file format run offline, through the server's own routes (in process, no port): each
input line `{"custom_id", "method": "POST", "url": "/v1/chat/completions" (or any POST route:
completions, embeddings, score, rerank, pooling, ...), "body"}` gives one output line, in
input order, `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`;
a request the route refuses keeps its 4xx status and error body; a line that is not a request
(bad JSON, a field missing, a GET) has `response: null` and `error: {"code", "message"}`.
Requests run concurrently (`--max-concurrency`), as a server's clients would.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import deque
from pathlib import Path
from typing import Any

MAX_CONCURRENCY = 256  # requests in flight: enough to fill the engine's batch


def run_batch_command(parser) -> Any:
    from polymodal.engine_args import add_engine_arguments

    parser.description = "Run an OpenAI batch file (JSONL) through the server's routes."
    parser.add_argument("-i", "--input-file", required=True, help="the requests, one per line")
    parser.add_argument("-o", "--output-file", required=True, help="the results, one per line")
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        help="the names requests' `model` may give (default: MODEL)",
    )
    parser.add_argument("--max-concurrency", type=int, default=MAX_CONCURRENCY)
    parser.add_argument(
        "--allowed-media-dir", help="let requests name local media files under this directory"
    )
    add_engine_arguments(parser)

    def run(args) -> int:
        from polymodal.async_engine import AsyncEngine
        from polymodal.engine_args import engine_kwargs
        from polymodal.server.app import create_app

        lines = Path(args.input_file).read_text().splitlines()
        if args.max_concurrency < 1:
            print("polymodal run-batch: --max-concurrency must be at least 1", file=sys.stderr)
            return 2
        engine = AsyncEngine(args.model, **engine_kwargs(args))
        try:
            with open(args.output_file, "w") as out:
                names = args.served_model_name or [args.model]
                app = create_app(engine, names, allowed_media_dir=args.allowed_media_dir)
                asyncio.run(run_lines(app, lines, out, args.max_concurrency))
        finally:
            engine.close()
        return 0

    return run


async def run_lines(app, lines: list[str], out, max_concurrency: int) -> None:
    """Each non-empty line through `app`'s routes, results written in input order."""
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as c:
        pending: deque = deque()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if len(pending) >= max_concurrency:
                out.write(json.dumps(await pending.popleft()) + "\n")
            pending.append(asyncio.ensure_future(one_line(c, number, line)))
        while pending:
            out.write(json.dumps(await pending.popleft()) + "\n")


async def one_line(client, number: int, line: str) -> dict[str, Any]:
    """One output record for input line `number`."""
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": None, "response": None,
              "error": None}  # fmt: skip
    try:
        request = json.loads(line)
    except ValueError as exc:
        return {**record, "error": _error(f"line {number}: not JSON ({exc})")}
    if not isinstance(request, dict):
        return {**record, "error": _error(f"line {number}: not a JSON object")}
    record["custom_id"] = request.get("custom_id")
    missing = [k for k in ("custom_id", "method", "url", "body") if k not in request]
    if missing:
        return {**record, "error": _error(f"line {number}: missing {', '.join(missing)}")}
    if request["method"] != "POST" or not isinstance(request["body"], dict):
        return {**record, "error": _error(f"line {number}: a request is a POST with a JSON body")}
    if request["body"].get("stream"):
        return {**record, "error": _error(f"line {number}: stream is not taken in a batch")}
    response = await client.post(request["url"], json=request["body"])
    try:
        body = response.json()
    except ValueError:  # a text answer (a transcription's response_format "text", "srt")
        body = response.text
    request_id = (body.get("id") if isinstance(body, dict) else None) or f"batch_{uuid.uuid4().hex}"
    record["response"] = {"status_code": response.status_code, "request_id": request_id,
                          "body": body}  # fmt: skip
    return record


def _error(message: str) -> dict[str, str]:
    return {"code": "invalid_request", "message": message}
