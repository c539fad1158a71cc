"""Running one HTTP request's engine requests: submit, wait for each one's first output (so
input errors are still a 4xx), then answer as one JSON body or one merged event stream.
A client that disconnects has all of its requests aborted and their KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware as StarletteCORS

from polymodal.async_engine import AsyncEngine
from polymodal.beam_search import BeamSearch, BeamSearchParams
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.outputs import CompletionOutput, RequestOutput, Usage
from polymodal.server.errors import RequestError
from polymodal.server.openai_format import request_error
from polymodal.server.protocol import ErrorInfo, ErrorResponse
from polymodal.server.responses import DONE, ResponseBuilder, sse

logger = logging.getLogger("polymodal.server")


def error_response(status: int, message: str, param=None, kind=None, code=None) -> JSONResponse:
    """An OpenAI-shaped error answer."""
    kind = kind or ("invalid_request_error" if status < 500 else "internal_error")
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


class CORSMiddleware(StarletteCORS):
    """Starlette's CORS middleware whose refused preflights are OpenAI-shaped errors (400, as
    Starlette answers them, naming the origin), not plain text."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        origin = request_headers.get("origin")
        message = f"{bytes(response.body).decode()} (origin {origin!r}; see --allowed-origins)"
        refused = error_response(400, message, param="Origin")
        for name in ("access-control-allow-methods", "access-control-max-age", "vary"):
            if name in response.headers:
                refused.headers[name] = response.headers[name]
        return refused


class RequestIdHeaders:
    """vLLM's `--enable-request-id-headers`: every response carries `X-Request-Id`, the
    request's own (its header) or a fresh one (pure ASGI: disconnects still reach handlers)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id")
        value = given or uuid.uuid4().hex.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", value)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def client_error(
    exc: PolymodalError, param: str | None, fields: dict[str, str] | None = None
) -> JSONResponse:
    """The answer to a PolymodalError: 400 (404 for an unknown model) naming its request field
    (`fields`: see `request_error`), or 500 for a server-side failure."""
    if isinstance(exc, RequestError):
        return error_response(exc.status, str(exc), exc.param, code=exc.code)
    status = 400 if isinstance(exc, InvalidInputError) else 500
    message, param = request_error(exc, param, fields)
    return error_response(status, message, param=param)


def log_requests(endpoint: str, ids: list[str], prompts: list, params: Any, lora: Any,
                 max_len: int | None) -> None:  # fmt: skip
    """One log line per engine request (vLLM's `--enable-log-requests`): its id, endpoint,
    prompt (its first `max_len` characters, `--max-log-len`; media as their kind) and params."""
    for request_id, prompt in zip(ids, prompts):
        text = _described(prompt)
        if max_len is not None and len(text) > max_len:
            text = text[:max_len] + "..."
        adapter = f", lora: {lora.lora_name}" if lora is not None else ""
        logger.info("Received request %s (%s): prompt: %s, params: %s%s", request_id,
                    endpoint, text, params, adapter)  # fmt: skip


def _described(prompt: Any) -> str:
    """A prompt as a log line shows it: text as is, token ids as a list, a conversation's text
    with each media part as `<its type>`, given embeddings by their shape."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, dict):
        return repr(prompt)
    if "prompt_embeds" in prompt:
        return f"<prompt_embeds {list(prompt['prompt_embeds'].shape)}>"
    if "messages" not in prompt:
        return _described(prompt.get("prompt", prompt.get("prompt_token_ids")))
    lines = []
    for message in prompt["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") if p.get("type") == "text" else
                              f"<{p.get('type')}>" for p in content)  # fmt: skip
        lines.append(f"{message.get('role')}: {content}")
    return " | ".join(lines)


async def run_job(
    request: Request,
    engine: AsyncEngine,
    metrics: Any,
    endpoint: str,
    prompts: list[Any],
    params: Any,
    builder: ResponseBuilder,
    stream: bool,
    include_usage: bool,
    param: str,
    lora_request: Any = None,
    fields: dict[str, str] | None = None,
) -> Response:
    """Submit one engine request per prompt (all with `params` and `lora_request`, the
    adapter the request's model name selects) and answer them together. An input error names
    `param`, or the request field (`fields`: SamplingParams name -> it) the engine's names."""
    start, arrival_wall = time.monotonic(), time.time()
    ids = [engine.submit(p, params, lora_request=lora_request) for p in prompts]
    max_log_len = getattr(request.app.state, "log_requests", False)
    if max_log_len is not False:  # --enable-log-requests
        log_requests(endpoint, ids, prompts, params, lora_request, max_log_len)
    streams = [engine.stream(i) for i in ids]
    watcher = asyncio.create_task(_abort_on_disconnect(request, engine, ids))
    first_at = first_wall = None  # when the first tokens reached the server

    async def cleanup(status: str, finals: list[RequestOutput] | None = None) -> None:
        # synchronous work first: under cancellation every await may raise again
        watcher.cancel()
        if status != "ok":  # (all finished: nothing to abort, no command to send)
            for request_id in ids:
                engine.abort(request_id)
        ttft = first_at - start if first_at is not None else None
        metrics.observe(endpoint, status, time.monotonic() - start, finals, ttft,
                        arrival_wall, first_wall)  # fmt: skip
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()

    try:
        firsts = [await s.__anext__() for s in streams]
        first_at, first_wall = time.monotonic(), time.time()
    except asyncio.CancelledError:  # the server cancelled us: the client went away
        await cleanup("aborted")
        raise
    except StopAsyncIteration:  # aborted: the client went away
        await cleanup("aborted")
        return Response(status_code=499)
    except PolymodalError as exc:
        await cleanup("client_error")
        return client_error(exc, param, fields)
    except Exception as exc:  # noqa: BLE001 - an engine failure: 500, the server goes on
        await cleanup("error")
        return error_response(500, f"engine error: {exc}")
    if stream:
        events = _events(firsts, streams, builder, include_usage, cleanup, metrics)
        return StreamingResponse(events, media_type="text/event-stream")
    finals = []
    try:
        for first, s in zip(firsts, streams):
            final = first
            async for final in s:  # noqa: B007 - keep the last one
                pass
            finals.append(final)
    except asyncio.CancelledError:
        await cleanup("aborted")
        raise
    except Exception as exc:  # noqa: BLE001
        await cleanup("error")
        return error_response(500, f"engine error: {exc}")
    if not all(f.finished for f in finals):
        await cleanup("aborted")
        return Response(status_code=499)
    await cleanup("ok", finals)
    return JSONResponse(builder.full(finals).model_dump())


async def _events(firsts, streams, builder: ResponseBuilder, include_usage: bool, cleanup, metrics):
    """The SSE body: chunks per step of every request (merged as they come), an optional usage
    chunk, then `data: [DONE]`."""
    finals, status = list(firsts), "aborted"
    running = [(p, s) for p, s in enumerate(streams) if not firsts[p].finished]
    last = [time.monotonic()] * len(streams)
    updates = _merged(running) if len(running) != 1 else _indexed(*running[0])
    # the events of one step go out as one body chunk (one socket write, not one per event)
    try:
        events = [event for p, first in enumerate(firsts) for event in builder.chunks(p, first)]
        if events:
            yield "".join(events)
        async for p, out in updates:
            now = time.monotonic()
            tokens = max(len(c.delta_token_ids) for c in out.outputs)
            metrics.observe_stream_gap(now - last[p], tokens)
            finals[p], last[p] = out, now
            events = builder.chunks(p, out)
            if events:
                yield "".join(events)
        if all(f.finished for f in finals):
            status = "ok"
            yield (builder.usage_chunk(finals) if include_usage else "") + DONE
    except PolymodalError as exc:
        status = "error"
        yield sse({"error": {"message": str(exc), "type": "invalid_request_error"}})
        yield DONE
    except Exception as exc:  # noqa: BLE001 - report engine failures in-band, then end
        status = "error"
        yield sse({"error": {"message": f"engine error: {exc}", "type": "internal_error"}})
        yield DONE
    finally:
        await updates.aclose()
        await cleanup(status, finals if status == "ok" else None)


async def _indexed(p: int, outputs):
    """`(p, output)` of one stream (a chat request, the common case): no task, no queue."""
    async for out in outputs:
        yield p, out


async def _merged(streams: list[tuple[int, Any]]):
    """`(index, output)` of several streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, outputs) -> None:
        try:
            async for out in outputs:
                await queue.put((p, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((p, exc))
        finally:
            await queue.put((p, None))

    pumps = [asyncio.create_task(pump(p, s)) for p, s in streams]
    try:
        remaining = len(pumps)
        while remaining:
            p, out = await queue.get()
            if out is None:
                remaining -= 1
            elif isinstance(out, Exception):
                raise out
            else:
                yield p, out
    finally:
        for task in pumps:
            task.cancel()


async def _abort_on_disconnect(request: Request, engine: AsyncEngine, ids: list[str]) -> None:
    """Wait for the client to go away, then abort its requests. (The body is read by now,
    so the server's next message is the disconnect. Polling `is_disconnected` every 0.2 s
    cost ~40% of the event loop at 256 streams: each poll builds an anyio cancel scope.)"""
    with contextlib.suppress(asyncio.CancelledError):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for request_id in ids:
            engine.abort(request_id)


async def run_beam_search(
    engine: AsyncEngine, prompt: Any, params: BeamSearchParams
) -> RequestOutput:
    """vLLM's `use_beam_search` for one prompt: the beams as the choices of one output."""
    processed = await engine.process(prompt)
    search = BeamSearch([processed], params, engine.model_info["eos_token_ids"])
    while not search.done:
        outs = await asyncio.gather(
            *(engine.generate(p, search.scoring_params) for p in search.requests())
        )
        search.advance([out.outputs[0].logprobs[0] for out in outs])
    (result,) = search.outputs(None)
    tokenizer, n_prompt = engine.tokenizer, len(processed.token_ids)
    choices = []
    for i, seq in enumerate(result.sequences):
        generated = seq.tokens[n_prompt:]
        shown = generated[:-1] if seq.finish_reason == "stop" else generated
        choices.append(
            CompletionOutput(
                index=i,
                text=tokenizer.decode(shown, skip_special_tokens=True),
                token_ids=generated,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                cumulative_logprob=seq.cum_logprob,
            )
        )
    usage = Usage(n_prompt, sum(len(c.token_ids) for c in choices))
    return RequestOutput("beam", processed.token_ids, choices, True, usage)
