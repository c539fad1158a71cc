"""`polymodal serve MODEL`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse

from polymodal.engine_args import add_engine_arguments, engine_kwargs


def serve_command(parser: argparse.ArgumentParser):
    """Add the `serve` arguments; returns `run(args) -> int`."""
    parser.description = "Serve a model over an OpenAI-compatible HTTP API."
    parser.add_argument("model", help="hub id or local checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model id clients use (default: MODEL)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    parser.add_argument(
        "--allowed-media-dir", help="let requests name local media files under this directory"
    )
    parser.add_argument("--allow-http", action="store_true", help="fetch http(s) media URLs")
    parser.add_argument("--default-max-tokens", type=int, help="when a request sets none")
    parser.add_argument("--log-level", default="info")
    add_engine_arguments(parser)

    def run(args) -> int:
        import uvicorn

        from polymodal.async_engine import AsyncEngine
        from polymodal.server.app import create_app

        engine = AsyncEngine(args.model, **engine_kwargs(args))
        app = create_app(
            engine,
            args.served_model_name or args.model,
            api_key=args.api_key,
            allowed_media_dir=args.allowed_media_dir,
            allow_http=args.allow_http,
            default_max_tokens=args.default_max_tokens,
        )
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
        finally:
            engine.close()
        return 0

    return run
