"""`polymodal serve MODEL`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polymodal.engine_args import add_engine_arguments, engine_kwargs, lora_modules
from polymodal.feeder import PROCESS_WORKERS


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a file's contents, or the template itself when given inline (as
    vLLM: text with jinja braces or newlines is a template; anything else must be a file)."""
    if value is None:
        return None
    if any(c in value for c in "{}\n"):  # a template (however long: no file name to stat)
        return value
    path = Path(value)
    if path.is_file():
        return path.read_text()
    raise SystemExit(f"polymodal serve: --chat-template {value!r}: no such file")


def parse_origins(value: str) -> list[str]:
    """`--allowed-origins`: a JSON list (vLLM's form) or comma-separated origins."""
    value = value.strip()
    if value.startswith("["):
        origins = json.loads(value)
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise argparse.ArgumentTypeError("--allowed-origins: a JSON list of strings")
        return origins
    return [o.strip() for o in value.split(",") if o.strip()]


def serve_app(app, host: str, port: int, log_level: str = "info", **uvicorn_options) -> None:
    """Run `app` on uvicorn until it is stopped (`polymodal serve` and the frontend bench);
    `uvicorn_options`: TLS files, `root_path`, `access_log`."""
    import uvicorn

    from polymodal.engine_process import freeze_heap

    freeze_heap()  # what the app holds now (modules, torch, the tokenizer) lives on
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options)


def uvicorn_options(args: argparse.Namespace) -> dict:
    """uvicorn's settings from vLLM's serve options (TLS, a proxy's path prefix, access log)."""
    options = {
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_certfile": args.ssl_certfile,
        "ssl_ca_certs": args.ssl_ca_certs,
        "root_path": args.root_path,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if args.disable_uvicorn_access_log:
        options["access_log"] = False
    for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = options.get(name)
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"polymodal serve: --{name.replace('_', '-')} {path}: no such file")
    if ("ssl_keyfile" in options) != ("ssl_certfile" in options):
        raise SystemExit("polymodal serve: --ssl-keyfile and --ssl-certfile go together")
    return options


def option_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the serve options that argparse cannot see, or None."""
    checks = (
        (args.media_workers < 1, "--media-workers must be at least 1"),
        (args.media_processes < 0, "--media-processes must be 0 or more"),
        (args.data_parallel_size < 1, "--data-parallel-size must be at least 1"),
        (args.api_server_count != 1, "--api-server-count: only 1 (one API process serves)"),
        (args.chat_template_content_format != "auto",
         "--chat-template-content-format: only auto (each model family's processor lays out "
         "message content as its chat template expects)"),
        (args.disable_frontend_multiprocessing and args.data_parallel_size > 1,
         "--disable-frontend-multiprocessing keeps one engine in the server's process: not "
         "with --data-parallel-size"),
    )  # fmt: skip
    return next((message for failed, message in checks if failed), None)


def serve_command(parser: argparse.ArgumentParser):
    """Add the `serve` arguments; returns `run(args) -> int`."""
    parser.description = "Serve a model over an OpenAI-compatible HTTP API."
    parser.add_argument("model", help="hub id or local checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        help="the model id(s) clients use; requests naming another get a 404 (default: MODEL)",
    )
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on API routes")
    parser.add_argument(
        "--allowed-media-dir",
        "--allowed-local-media-path",  # vLLM's spelling
        dest="allowed_media_dir",
        help="let requests name local media files under this directory",
    )
    parser.add_argument("--allow-http", action="store_true", help="fetch http(s) media URLs")
    parser.add_argument("--default-max-tokens", type=int, help="when a request sets none")
    parser.add_argument(
        "--allowed-origins",
        type=parse_origins,
        help='CORS: origins allowed to call the API, e.g. \'["https://app.example"]\' or "*"',
    )
    parser.add_argument("--chat-template", help="a Jinja chat template (file or inline)")
    parser.add_argument(
        "--generation-config",
        default="auto",
        help="sampling defaults: 'auto' (the model's generation_config.json), 'vllm' (none), "
        "or a folder holding a generation_config.json",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=[
            "hermes",
            "llama3_json",
            "mistral",
            "pythonic",
            "llama4_pythonic",
            "deepseek_v3",
            "phi4_mini_json",
        ],  # fmt: skip
        help="the model's tool-call format: hermes (Qwen2.5 / Qwen3 / Hermes), llama3_json "
        "(Llama 3.x), mistral, pythonic (Llama 3.2 / 4), llama4_pythonic, deepseek_v3, "
        "phi4_mini_json (Phi-4-mini / -multimodal)",
    )
    parser.add_argument(
        "--reasoning-parser",
        choices=["deepseek_r1", "qwen3"],
        help="put chat replies' <think>...</think> apart as message.reasoning_content "
        "(DeepSeek-R1 and its distills, QwQ, Qwen3)",
    )
    parser.add_argument(
        "--media-workers",
        type=int,
        default=PROCESS_WORKERS,
        help="threads in the engine process that load, resize and hash media and tokenize "
        f"prompts (default {PROCESS_WORKERS}); with media processes, they only stage media",
    )
    parser.add_argument(
        "--media-processes",
        type=int,
        default=0,
        help="worker processes that load media and tokenize the prompts carrying it, off the "
        "engine process's GIL; a decoder crash then kills a worker, not the engine (default 0: "
        "the media workers' threads do it all)",
    )
    parser.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="engine processes of the model, each on its own GPUs (tensor-parallel-size each); "
        "requests go to the least loaded (default 1)",
    )
    parser.add_argument("--log-level", "--uvicorn-log-level", dest="log_level", default="info")
    parser.add_argument("--ssl-keyfile", help="TLS: the server's private key (PEM)")
    parser.add_argument("--ssl-certfile", help="TLS: the server's certificate (PEM)")
    parser.add_argument("--ssl-ca-certs", help="TLS: CA certificates to check clients' with")
    parser.add_argument("--root-path", help="the path prefix a proxy serves the API under")
    parser.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="no line per HTTP request"
    )
    parser.add_argument("--disable-fastapi-docs", action="store_true", help="no /docs, /redoc")
    parser.add_argument("--response-role", default="assistant", help="chat replies' role")
    parser.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help='logprobs name tokens as "token_id:N" unless a request says otherwise',
    )
    parser.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage reports the prompt tokens served from the prefix cache",
    )
    parser.add_argument(
        "--enable-mm-embeds",
        action="store_true",
        help="chat messages may carry image_embeds parts (base64 torch.save tensors)",
    )
    parser.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log a line per request: its id, prompt (media as their kind) and params",
    )
    parser.add_argument(
        "--max-log-len", type=int, help="with --enable-log-requests: prompts cut at N characters"
    )
    parser.add_argument(
        "--allowed-methods", type=json.loads, help='CORS: methods allowed (default ["*"])'
    )
    parser.add_argument(
        "--allowed-headers", type=json.loads, help='CORS: headers allowed (default ["*"])'
    )
    parser.add_argument(
        "--disable-frontend-multiprocessing",
        action="store_true",
        help="run the engine in the server's process (default: a process of its own)",
    )
    parser.add_argument(
        "--chat-template-content-format",
        default="auto",
        choices=("auto", "string", "openai"),
        help="vLLM's: only auto (each family's processor lays out message content as its "
        "template expects)",
    )
    parser.add_argument(
        "--api-server-count", type=int, default=1, help="vLLM's: only 1 (one API process)"
    )
    parser.add_argument("--seed", type=int, help="the engine's random stream (default 0)")
    parser.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="X-Request-Id on every response: the request's own header, or a fresh id",
    )
    for flag in ("--disable-log-requests", "--disable-log-stats"):  # vLLM's command lines
        parser.add_argument(flag, action="store_true", help="accepted: polymodal logs neither")
    add_engine_arguments(parser)

    def run(args) -> int:
        from polymodal.async_engine import AsyncEngine
        from polymodal.server.app import create_app

        if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
            print(
                "polymodal serve: --enable-auto-tool-choice and --tool-call-parser go together",
                file=sys.stderr,
            )
            return 2
        chat_template = load_chat_template(args.chat_template)
        try:
            adapters = lora_modules(args.lora_modules)
        except ValueError as exc:
            print(f"polymodal serve: {exc}", file=sys.stderr)
            return 2
        problem = option_error(args)
        if problem is not None:
            print(f"polymodal serve: {problem}", file=sys.stderr)
            return 2
        server_options = uvicorn_options(args)  # a missing TLS file fails before the model loads
        engine = AsyncEngine(
            args.model,
            process_workers=args.media_workers,
            media_processes=args.media_processes,
            data_parallel_size=args.data_parallel_size,
            separate_process=not args.disable_frontend_multiprocessing,
            generation_config=args.generation_config,
            serving=True,
            **engine_kwargs(args),
            **({} if args.seed is None else {"seed": args.seed}),
            # structured output after the reasoning (the grammar waits for its end tag)
            **({"reasoning_parser": args.reasoning_parser} if args.reasoning_parser else {}),
        )
        app = create_app(
            engine,
            args.served_model_name or [args.model],
            api_key=args.api_key,
            allowed_media_dir=args.allowed_media_dir,
            allow_http=args.allow_http,
            default_max_tokens=args.default_max_tokens,
            allowed_origins=args.allowed_origins,
            allowed_methods=args.allowed_methods,
            allowed_headers=args.allowed_headers,
            chat_template=chat_template,
            tool_call_parser=args.tool_call_parser,
            lora_modules=adapters,
            reasoning_parser=args.reasoning_parser,
            request_id_headers=args.enable_request_id_headers,
            response_role=args.response_role,
            tokens_as_ids=args.return_tokens_as_token_ids,
            tokens_details=args.enable_prompt_tokens_details,
            mm_embeds=args.enable_mm_embeds,
            api_docs=not args.disable_fastapi_docs,
        )
        # --enable-log-requests: a line per request, its prompt cut at --max-log-len
        app.state.log_requests = args.max_log_len if args.enable_log_requests else False
        try:
            serve_app(app, args.host, args.port, args.log_level, **server_options)
        finally:
            engine.close()
        return 0

    return run
