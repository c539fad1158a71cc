"""The OpenAI-compatible FastAPI app over one `AsyncEngine`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`,
`GET /metrics`. Every error is OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`.
A client that disconnects (streaming or not) has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from polymodal.async_engine import AsyncEngine
from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.server.metrics import ServerMetrics
from polymodal.server.openai_format import MediaPolicy, RequestError, engine_messages, error_param
from polymodal.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from polymodal.server.responses import DONE, ResponseBuilder, sse

DISCONNECT_POLL_S = 0.2


class _AuthError(Exception):
    """The request's bearer token does not match `--api-key`."""


def error_response(status: int, message: str, param=None, kind=None, code=None) -> JSONResponse:
    """An OpenAI-shaped error answer."""
    kind = kind or ("invalid_request_error" if status < 500 else "internal_error")
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def create_app(
    engine: AsyncEngine,
    model_name: str,
    *,
    api_key: str | None = None,
    allowed_media_dir: str | Path | None = None,
    allow_http: bool = False,
    default_max_tokens: int | None = None,
) -> FastAPI:
    """Build the app; the caller owns `engine` (and closes it after the server stops)."""
    app = FastAPI(title="polymodal", version="0.1.0")
    metrics = ServerMetrics(engine)
    policy = MediaPolicy(Path(allowed_media_dir) if allowed_media_dir else None, allow_http)
    if allow_http:
        engine.set_processor_option("allow_http", True)
    tokenizer = engine.tokenizer
    app.state.engine, app.state.metrics = engine, metrics

    async def check_api_key(request: Request) -> None:
        # A dependency, not an HTTP middleware: BaseHTTPMiddleware wraps `receive` and would
        # hide client disconnects from the handlers.
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise _AuthError()

    @app.exception_handler(_AuthError)
    async def on_auth_error(request: Request, exc: _AuthError):
        return error_response(
            401, "invalid or missing API key", None, "authentication_error", "invalid_api_key"
        )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = _dotted(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, param=param, code=first.get("type"))

    @app.exception_handler(InvalidInputError)
    async def on_invalid_input(request: Request, exc: InvalidInputError):
        code = exc.code if isinstance(exc, RequestError) else "invalid_value"
        return error_response(400, str(exc), param=error_param(exc, None), code=code)

    @app.get("/health")
    async def health():
        s = engine.stats
        if not engine.alive:
            return error_response(503, "the engine process is not running", kind="internal_error")
        return {
            "status": "ok",
            "running": s.num_running,
            "waiting": s.num_waiting,
            "free_kv_blocks": s.num_free_blocks,
            "total_kv_blocks": s.num_total_blocks,
        }

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        card = ModelCard(id=model_name, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        params = body.sampling_params(default_max_tokens)
        prompt = {"messages": engine_messages(body.messages, policy)}
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        builder = ResponseBuilder("chat", model_name, tokenizer, top_n)
        return await _run(request, body, prompt, params, builder, "chat", "messages")

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        params = body.sampling_params(default_max_tokens)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise RequestError("only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        builder = ResponseBuilder("completion", model_name, tokenizer, body.logprobs)
        return await _run(request, body, prompt, params, builder, "completion", "prompt")

    async def _run(request, body, prompt, params, builder, endpoint: str, param: str):
        """Submit, wait for the first output (so input errors are still a 4xx), then answer."""
        start = time.monotonic()
        request_id = engine.submit(prompt, params)
        outputs = engine.stream(request_id)
        watcher = asyncio.create_task(_abort_on_disconnect(request, engine, request_id))

        first_at = None  # when the first token reached the server

        async def cleanup(status: str, final=None) -> None:
            # synchronous work first: under cancellation every await may raise again
            watcher.cancel()
            engine.abort(request_id)  # a no-op when it already finished
            ttft = first_at - start if first_at is not None else None
            metrics.observe(endpoint, status, time.monotonic() - start, final, ttft)
            with contextlib.suppress(BaseException):
                await outputs.aclose()

        try:
            first = await outputs.__anext__()
            first_at = time.monotonic()
        except asyncio.CancelledError:  # the server cancelled us: the client went away
            await cleanup("aborted")
            raise
        except StopAsyncIteration:  # aborted: the client went away
            await cleanup("aborted")
            return Response(status_code=499)
        except PolymodalError as exc:
            await cleanup("client_error")
            status = 400 if isinstance(exc, InvalidInputError) else 500
            return error_response(status, str(exc), param=error_param(exc, param))
        except Exception as exc:  # noqa: BLE001 - an engine failure: 500, the server goes on
            await cleanup("error")
            return error_response(500, f"engine error: {exc}")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _events(first, outputs, builder, include_usage, cleanup, metrics)
            return StreamingResponse(events, media_type="text/event-stream")
        final = first
        try:
            async for final in outputs:  # noqa: B007 - keep the last one
                pass
        except asyncio.CancelledError:
            await cleanup("aborted")
            raise
        except Exception as exc:  # noqa: BLE001
            await cleanup("error")
            return error_response(500, f"engine error: {exc}")
        if not final.finished:
            await cleanup("aborted")
            return Response(status_code=499)
        await cleanup("ok", final)
        return JSONResponse(builder.full(final).model_dump())

    app.include_router(v1)
    return app


async def _events(first, outputs, builder: ResponseBuilder, include_usage: bool, cleanup, metrics):
    """The SSE body: chunks per step, an optional usage chunk, then `data: [DONE]`."""
    final, status = first, "aborted"
    try:
        for event in builder.chunks(first):
            yield event
        if not first.finished:
            last = time.monotonic()
            async for final in outputs:
                now = time.monotonic()
                tokens = max(len(c.delta_token_ids) for c in final.outputs)
                metrics.observe_stream_gap(now - last, tokens)
                last = now
                for event in builder.chunks(final):
                    yield event
        if final.finished:
            status = "ok"
            if include_usage:
                yield builder.usage_chunk(final)
            yield DONE
    except PolymodalError as exc:
        status = "error"
        yield sse({"error": {"message": str(exc), "type": "invalid_request_error"}})
        yield DONE
    except Exception as exc:  # noqa: BLE001 - report engine failures in-band, then end
        status = "error"
        yield sse({"error": {"message": f"engine error: {exc}", "type": "internal_error"}})
        yield DONE
    finally:
        await cleanup(status, final if status == "ok" else None)


async def _abort_on_disconnect(request: Request, engine: AsyncEngine, request_id: str) -> None:
    """Poll the connection; when the client is gone, abort its request."""
    with contextlib.suppress(asyncio.CancelledError):
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        engine.abort(request_id)


def _dotted(loc: list[str]) -> str:
    """('messages', '0', 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out
