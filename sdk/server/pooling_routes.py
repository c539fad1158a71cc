"""vLLM's pooling routes (`/v1/embeddings`, `/pooling`, `/classify`, `/score`, `/rerank`).

The served models are generative: each route answers an OpenAI-shaped 400 saying so, rather
than a bare 404, so a client learns why. Pooling models will answer them here.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from polymodal.server.serving import error_response

POOLING_ROUTES = (
    "/v1/embeddings",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
)


def add_pooling_routes(router: APIRouter, model_name: str, architecture: str) -> None:
    """Register every pooling route on `router` (which carries the API-key check)."""

    async def not_a_pooling_model(request: Request):
        return error_response(
            400,
            f"the served model {model_name!r} ({architecture}) is a generative model, not a "
            f"pooling model: {request.url.path} is not available; use /v1/chat/completions or "
            "/v1/completions",
            code="model_not_supported",
        )

    for path in POOLING_ROUTES:
        router.add_api_route(path, not_a_pooling_model, methods=["POST"])
