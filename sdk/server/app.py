"""The OpenAI-compatible FastAPI app over one `AsyncEngine`.

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses`
(`responses_api.py`), `POST /v1/audio/transcriptions`
and `/v1/audio/translations` (speech models), `GET /v1/models`,
`GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`, vLLM's pooling routes
(`pooling_routes.py`: for pooling models; a 400 for the others, and generation routes answer
a pooling model with a 400), `GET /health` (`/ping`), `/version`, `/metrics`. Every error is
OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`. A client that disconnects
(streaming or not) has its requests aborted and their KV blocks freed.
"""

from __future__ import annotations

import asyncio
import hmac
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from polymodal import __version__
from polymodal.async_engine import AsyncEngine
from polymodal.beam_search import BeamSearchParams
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.profiler import trace_dir
from polymodal.llm_pooling import is_cross_encoder
from polymodal.server.audio_routes import add_audio_routes
from polymodal.server.errors import RequestError
from polymodal.server.lora_routes import add_lora_routes, runtime_updates_allowed
from polymodal.server.metrics import ServerMetrics
from polymodal.server.openai_format import MediaPolicy, engine_messages, request_error
from polymodal.server.pooling_routes import add_pooling_routes, serving_routes
from polymodal.server.prompt_embeds import decode_prompt_embeds
from polymodal.server.protocol import ModelCard, ModelList
from polymodal.server.reasoning import PARSERS as REASONING_PARSERS
from polymodal.server.requests import ChatCompletionRequest, CompletionRequest
from polymodal.server.responses import ResponseBuilder, Shape
from polymodal.server.responses_api import add_responses_route
from polymodal.server.serving import (
    CORSMiddleware,
    RequestIdHeaders,
    error_response,
    run_beam_search,
    run_job,
)
from polymodal.server.sleep_routes import add_profile_routes, add_sleep_routes
from polymodal.server.token_routes import add_token_routes
from polymodal.server.tools import TOOL_PARSERS, tool_params


class _AuthError(Exception):
    """The request's bearer token does not match `--api-key`."""


def create_app(
    engine: AsyncEngine,
    model_name: str | list[str],
    *,
    api_key: str | None = None,
    allowed_media_dir: str | Path | None = None,
    allow_http: bool = False,
    default_max_tokens: int | None = None,
    allowed_origins: list[str] | None = None,
    allowed_methods: list[str] | None = None,
    allowed_headers: list[str] | None = None,
    chat_template: str | None = None,
    tool_call_parser: str | None = None,
    lora_modules: dict[str, Any] | None = None,
    reasoning_parser: str | None = None,
    request_id_headers: bool = False,
    response_role: str = "assistant",
    tokens_as_ids: bool = False,
    tokens_details: bool = False,
    mm_embeds: bool = False,
    api_docs: bool = True,
) -> FastAPI:
    """Build the app; the caller owns `engine` (and closes it after the server stops).

    `model_name`: the served name(s) a request's `model` must match (the first is reported).
    `lora_modules`: served name -> `LoRARequest`: a request naming one runs with that adapter
    (vLLM's `--lora-modules`; they are listed in `/v1/models` with the base model as parent).
    `allowed_origins` turns CORS on (`allowed_methods`, `allowed_headers`: default all);
    `chat_template` replaces the checkpoint's;
    `tool_call_parser` (hermes, llama3_json, mistral) enables `tool_choice: "auto"`;
    `reasoning_parser` (deepseek_r1, qwen3) puts chat replies' thinking apart (reasoning.py);
    `request_id_headers` adds `X-Request-Id` to every response; `response_role` names chat
    replies' role, `tokens_as_ids` is `return_tokens_as_token_ids`' default; `tokens_details`
    reports cached prompt tokens in `usage.prompt_tokens_details` (vLLM's
    `--enable-prompt-tokens-details`); `mm_embeds` takes `image_embeds` message parts;
    `api_docs=False` serves no /docs, /redoc, /openapi.json.
    """
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    docs = {} if api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="polymodal", version=__version__, **docs)
    if allowed_origins:
        # pure ASGI (unlike BaseHTTPMiddleware): client disconnects still reach the handlers
        app.add_middleware(
            CORSMiddleware, allow_origins=allowed_origins, allow_methods=allowed_methods or ["*"],
            allow_headers=allowed_headers or ["*"], allow_credentials="*" not in allowed_origins,
        )  # fmt: skip
    if request_id_headers:
        app.add_middleware(RequestIdHeaders)
    metrics = ServerMetrics(engine)
    policy = MediaPolicy(Path(allowed_media_dir) if allowed_media_dir else None, allow_http,
                         mm_embeds)  # fmt: skip
    if allow_http:
        engine.set_processor_option("allow_http", True)
    for name, value, known in (
        ("tool_call_parser", tool_call_parser, sorted(TOOL_PARSERS)),
        ("reasoning_parser", reasoning_parser, REASONING_PARSERS),
    ):
        if value is not None and value not in known:
            raise InvalidInputError(f"{name} {value!r} is unknown; choose from {list(known)}")
    parser = TOOL_PARSERS.get(tool_call_parser) if tool_call_parser else None
    tokenizer = engine.tokenizer
    defaults = dict(engine.model_info["default_sampling"])
    if default_max_tokens is not None:
        defaults["max_tokens"] = default_max_tokens
    app.state.engine, app.state.metrics = engine, metrics

    async def check_api_key(request: Request) -> None:
        # a dependency: BaseHTTPMiddleware would hide client disconnects from the handlers
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise _AuthError()

    adapters = dict(lora_modules or {})
    if adapters and engine.engine is not None:  # in process: check them now, not per request
        for lora in adapters.values():
            engine.engine.check_lora(lora)

    takes = engine.model_info.get("modalities", ())
    # the engine holds grammars back until the reasoning ends (its reasoning_parser)
    grammar_waits = reasoning_parser is not None and engine.model_info.get("grammar_waits")
    architecture = engine.model_info.get("architecture")
    task = engine.model_info.get("task", "generate")

    def generates(path: str) -> None:
        """400 for a generation route on a pooling model, naming the routes it serves."""
        if task != "generate":
            labels = engine.model_info.get("labels") or []
            routes = serving_routes(task, is_cross_encoder(task, len(labels)))
            raise RequestError(
                f"the served model {names[0]!r} ({architecture}) is a pooling model (task "
                f"{task!r}): it does not generate text, so {path} is not available; use "
                f"{', '.join(routes)}",
                "model", "model_not_supported",
            )  # fmt: skip

    def takes_audio(where: str) -> None:
        """400 for an audio part sent to a model without an audio encoder, naming it."""
        if "audio" not in takes:
            raise RequestError(
                f"{where}: model {names[0]!r} ({architecture}) takes no audio input: it has no "
                f"audio encoder (it takes {', '.join(takes) or 'text only'})",
                where, "unsupported_modality",
            )  # fmt: skip

    def check_model(name: str | None) -> str:
        """The served name a request asks for (404 OpenAI-shaped if it is not served)."""
        if name is None:
            return names[0]
        if name not in names and name not in adapters:
            raise RequestError(
                f"The model {name!r} does not exist; this server serves "
                f"{names + list(adapters)}",
                "model", "model_not_found", status=404,
            )  # fmt: skip
        return name

    @app.exception_handler(_AuthError)
    async def on_auth_error(request: Request, exc: _AuthError):
        return error_response(
            401, "invalid or missing API key", None, "authentication_error", "invalid_api_key"
        )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = _most_specific(exc.errors())
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_branch(p)]
        param = _dotted(loc) or None
        if first.get("type") == "json_invalid":  # loc is ("body", character offset)
            why = (first.get("ctx") or {}).get("error", first.get("msg"))
            message = f"the request body is not valid JSON: {why} (at character {loc[-1]})"
            return error_response(400, message, code="json_invalid")
        if first.get("type") == "extra_forbidden":
            message = f"{param}: unknown or unsupported field (docs/serving.md lists the fields)"
            return error_response(400, message, param=param, code="unsupported_field")
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, message, param=param, code=first.get("type"))

    @app.exception_handler(InvalidInputError)
    async def on_invalid_input(request: Request, exc: InvalidInputError):
        if isinstance(exc, RequestError):
            return error_response(exc.status, str(exc), param=exc.param, code=exc.code)
        message, param = request_error(exc, None)
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(Exception)
    async def on_server_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message, kind=kind, code=str(exc.status_code))

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

    for method in ("GET", "POST"):  # vLLM's (SageMaker's check); a route a method: one
        # OpenAPI operation id each (a two-method route gives both the same)
        app.add_api_route("/ping", health, methods=[method], name=f"ping_{method.lower()}")

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    # no key, no dependency to solve on every request
    keyed = [Depends(check_api_key)] if api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=keyed)
    auth = APIRouter(dependencies=keyed)

    def card(name: str) -> ModelCard:
        lora = adapters.get(name) if name not in names else None
        if lora is not None:  # as vLLM lists an adapter: its path as root, the base as parent
            return ModelCard(
                id=name, max_model_len=engine.max_model_len, root=lora.lora_path, parent=names[0]
            )
        return ModelCard(id=name, max_model_len=engine.max_model_len, root=name)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return ModelList(data=[card(n) for n in names + list(adapters)]).model_dump()

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        return card(check_model(model_id)).model_dump()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = check_model(body.model)
        generates("/v1/chat/completions")
        params = body.sampling_params()
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        shape = Shape("chat", top_n, params.n, role=response_role, cached_tokens=tokens_details)
        shape.take_extras(
            body, reasoning_parser, request.headers.get("x-request-id"), tokens_as_ids
        )
        if body.tools:
            params = tool_params(body, params, shape, parser)
        elif body.tool_choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", "tool_choice")
        if params.structured_outputs is not None and not grammar_waits:
            shape.reasoning = None  # a grammar from the first token leaves no room to think
        last = body.messages[-1]
        if body.echo and last.role == "assistant" and isinstance(last.content, str):
            shape.echo = [last.content]
        prompt = {
            "messages": engine_messages(body.messages, policy, takes_audio),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()] or None,
            "chat_template": body.chat_template or chat_template,
            "chat_template_kwargs": body.template_kwargs(),
            "add_generation_prompt": body.add_generation_prompt,
            "continue_final_message": body.continue_final_message,
            "documents": body.documents,
            "add_special_tokens": body.add_special_tokens,
            "mm_processor_kwargs": body.media_kwargs(),
        }
        prompt.update(body.prompt_extras())
        params = params.with_defaults({"max_tokens": None, **defaults})
        builder = ResponseBuilder(shape, served, tokenizer)
        if body.use_beam_search:
            if served in adapters:
                raise RequestError(
                    f"use_beam_search does not run LoRA adapters (model {served!r})", "model"
                )
            return await _beam(body, prompt, params, builder)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run_job(request, engine, metrics, "chat", [prompt], params, builder,
                             body.stream, include_usage, "messages",
                             adapters.get(served), body.field_names())  # fmt: skip

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = check_model(body.model)
        generates("/v1/completions")
        params = body.sampling_params().with_defaults({"max_tokens": 16, **defaults})
        prompts = body.prompts()
        if not body.add_special_tokens:
            prompts = [
                tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p
                for p in prompts
            ]
        shape = Shape("completion", body.logprobs, body.n or 1, cached_tokens=tokens_details)
        shape.take_extras(body, None, request.headers.get("x-request-id"), tokens_as_ids)
        if body.echo:
            shape.echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
            shape.echo_only = body.max_tokens == 0
        if body.prompt_embeds is not None:
            if not engine.model_info.get("prompt_embeds"):
                raise RequestError(
                    "prompt_embeds need the server started with --enable-prompt-embeds",
                    "prompt_embeds",
                )  # fmt: skip
            if body.echo:
                raise RequestError("echo needs prompt tokens: not with prompt_embeds", "echo")
            tensors = await asyncio.to_thread(decode_prompt_embeds, body.prompt_embeds)
            prompts += [{"prompt_embeds": t} for t in tensors]
        prompts = body.with_extras(prompts)
        builder = ResponseBuilder(shape, served, tokenizer)
        if body.use_beam_search:
            if served in adapters:
                raise RequestError(
                    f"use_beam_search does not run LoRA adapters (model {served!r})", "model"
                )
            if len(prompts) != 1:
                raise RequestError("use_beam_search takes one prompt", "prompt")
            return await _beam(body, prompts[0], params, builder)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await run_job(request, engine, metrics, "completion", prompts, params, builder,
                             body.stream, include_usage, "prompt",
                             adapters.get(served), body.field_names())  # fmt: skip

    async def _beam(body, prompt, params, builder: ResponseBuilder):
        if body.stream:
            raise RequestError("use_beam_search cannot be streamed", "stream")
        if params.max_tokens is None:
            raise RequestError("use_beam_search needs max_tokens", "max_tokens")
        beam = BeamSearchParams(
            beam_width=params.n, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
            length_penalty=body.length_penalty,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )  # fmt: skip
        out = await run_beam_search(engine, prompt, beam)
        return JSONResponse(builder.full([out]).model_dump())

    messages_of = partial(engine_messages, policy=policy, takes_audio=takes_audio)
    add_token_routes(auth, engine, check_model, messages_of, chat_template)
    add_pooling_routes(auth, engine, names[0], check_model, metrics, messages_of)
    add_audio_routes(v1, engine, check_model, takes_audio, defaults)
    if engine.model_info.get("sleep_mode"):
        add_sleep_routes(auth, engine)
    if trace_dir() is not None:
        add_profile_routes(auth, engine)
    if runtime_updates_allowed():
        add_lora_routes(v1, engine, adapters, names)
    chat_prompt = lambda m, tools=None: {  # noqa: E731
        "messages": messages_of(m), "tools": tools, "chat_template": chat_template}  # fmt: skip
    add_responses_route(v1, engine, metrics, check_model, generates, chat_prompt, defaults,
                        parser, reasoning_parser, grammar_waits)  # fmt: skip
    app.include_router(v1)
    app.include_router(auth)
    return app


def _most_specific(errors: list[dict]) -> dict:
    """The error to report: the deepest (a union such as a message's `content`, a string or a
    list of parts, reports one error per branch; the branch shaped like the input goes
    deepest, e.g. to the part whose `type` is unknown), the first among equals."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}
    return max(errors, key=lambda e: len(e.get("loc", ())))  # max keeps the first maximum


def _is_branch(part) -> bool:
    """A union branch's tag in pydantic's error location (`str`, `list[ContentPart]`)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _dotted(loc: list[str]) -> str:
    """('messages', '0', 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out
