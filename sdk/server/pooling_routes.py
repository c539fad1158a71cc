"""vLLM's pooling routes: `/v1/embeddings`, `/pooling`, `/classify`, `/score` (+ `/v1/score`),
`/rerank` (+ `/v1/rerank`), with vLLM's request and response shapes.

Each route serves the models whose task fits it (the registry row's task, in
`engine.model_info["task"]`): embeddings need an embedding model, `/classify` a classifier,
`/score` and `/rerank` a cross-encoder (a sequence classifier with one label: its relevance
score) or an embedding model (the cosine similarity of the two embeddings, as vLLM scores
with one), `/pooling` any pooling model. Any other model gets an OpenAI-shaped 400 naming it
and the routes it does serve. `/v1/embeddings` and `/pooling` take vLLM's chat form too
(`messages`: one conversation, one vector); every route takes `truncate_prompt_tokens`;
`dimensions` cuts a Matryoshka model's vectors. A request's inputs go to the engine together
(one engine request each, batched in its steps); an input the engine refuses (empty, too long,
a token id outside the vocab) is a 400 naming it, and the engine goes on serving the others.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from polymodal.async_engine import AsyncEngine
from polymodal.llm_core.embedding_head import check_dimensions
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.pooling import (
    PoolingParams,
    PoolingRequestOutput,
    check_pooling_request,
)
from polymodal.llm_pooling import cosine_scores, is_cross_encoder, score_pairs, truncate_length
from polymodal.server.errors import RequestError
from polymodal.server.pooling_requests import (
    ClassificationRequest,
    EmbeddingRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
    texts,
)
from polymodal.server.protocol import new_id
from polymodal.server.serving import _abort_on_disconnect

POOLING_ROUTES = (
    "/v1/embeddings",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
)


def serving_routes(task: str, cross_encoder: bool) -> list[str]:
    """The routes a model of `task` answers (for error messages)."""
    if task == "generate":
        return ["/v1/chat/completions", "/v1/completions"]
    routes = {"embed": ["/v1/embeddings"], "classify": ["/classify"]}.get(task, [])
    routes = [*routes, "/pooling"]
    return routes + (["/score", "/rerank"] if cross_encoder or task == "embed" else [])


def add_pooling_routes(
    router: APIRouter,
    engine: AsyncEngine,
    name: str,
    check_model: Callable,
    metrics: Any,
    messages_of: Callable | None = None,
) -> None:
    """Register every pooling route on `router` (which carries the API-key check);
    `messages_of`: chat-form inputs' messages checked and their media under the server's
    policy (`openai_format.engine_messages`)."""
    info = engine.model_info
    task, architecture = info.get("task", "generate"), info["architecture"]
    labels = info.get("labels") or []
    cross_encoder = is_cross_encoder(task, len(labels))
    scorer = cross_encoder or task == "embed"  # embedding models score by cosine similarity
    not_scorer = "a cross-encoder (a sequence classifier with one label) nor an embedding model"
    tokenizer = engine.tokenizer
    max_model_len = engine.max_model_len

    def refuse(path: str, wants: str) -> None:
        if task == "generate":
            raise RequestError(
                f"the served model {name!r} ({architecture}) is a generative model, not a "
                f"pooling model: {path} is not available; use /v1/chat/completions or "
                "/v1/completions",
                "model", "model_not_supported",
            )  # fmt: skip
        raise RequestError(
            f"the served model {name!r} ({architecture}, task {task!r}) is not {wants}: "
            f"{path} is not available; it serves {', '.join(serving_routes(task, cross_encoder))}",
            "model", "model_not_supported",
        )  # fmt: skip

    async def run(request: Request, endpoint: str, prompts: list, params: PoolingParams,
                  field: str | list[str]) -> list[PoolingRequestOutput]:  # fmt: skip
        start, status = time.monotonic(), "error"
        try:
            outs = await pool_prompts(request, engine, prompts, params, field)
            status = "ok"
            return outs
        except RequestError:
            status = "client_error"
            raise
        finally:
            metrics.observe(endpoint, status, time.monotonic() - start)

    def prepared(prompts: list, add_special_tokens: bool) -> list:
        if add_special_tokens or tokenizer is None:
            return prompts
        lower = info.get("do_lower_case", False)  # as the engine's own tokenizing does
        return [tokenizer.encode(p.lower() if lower else p, add_special_tokens=False)
                if isinstance(p, str) else p for p in prompts]  # fmt: skip

    def truncation(body: Any) -> int | None:
        """The request's `truncate_prompt_tokens`, checked against max_model_len (vLLM's
        400)."""
        keep = body.truncate_prompt_tokens
        if keep is not None and keep > max_model_len:
            raise RequestError(
                f"truncate_prompt_tokens: {keep} is greater than max_model_len "
                f"({max_model_len}); select a smaller truncation size",
                "truncate_prompt_tokens",
            )
        return keep

    async def embeddings(request: Request):
        if task != "embed":
            refuse("/v1/embeddings", "an embedding model")
        body = await parse(request, EmbeddingRequest)
        served = check_model(body.model)
        allowed, sizes = info.get("matryoshka") or (False, None)
        try:
            check_dimensions(
                body.dimensions, allowed, sizes, repr(name), info.get("embedding_dimension")
            )
        except InvalidInputError as exc:
            raise RequestError(str(exc), "dimensions", "unsupported_value") from None
        prompts = prepared(body.prompts(messages_of), body.add_special_tokens)
        params = PoolingParams(
            "embed", body.normalize, dimensions=body.dimensions,
            truncate_prompt_tokens=truncation(body),
        )  # fmt: skip
        outs = await run(request, "embeddings", prompts, params, "input")
        data = [
            {"index": i, "object": "embedding",
             "embedding": encoded(o.outputs.data.flatten(), body.encoding_format)}
            for i, o in enumerate(outs)
        ]  # fmt: skip
        return listing("embd", served, data, [o.prompt_token_ids for o in outs])

    async def pooling(request: Request):
        if task == "generate":
            refuse("/pooling", "a pooling model")
        body = await parse(request, PoolingRequest)
        served = check_model(body.model)
        wanted = body.task or task
        try:  # the engine's own rule (a per-token task needs the model's head and its file)
            check_pooling_request(PoolingParams(wanted), task, architecture, info["model_dir"])
        except InvalidInputError as exc:
            raise RequestError(f"task: {name!r}: {exc}", "task") from None
        prompts = prepared(body.prompts(messages_of), body.add_special_tokens)
        params = PoolingParams(
            wanted, body.normalize, body.activation, truncate_prompt_tokens=truncation(body)
        )
        outs = await run(request, "pooling", prompts, params, "input")
        data = [
            {"index": i, "object": "pooling",
             "data": encoded(o.outputs.data, body.encoding_format)}
            for i, o in enumerate(outs)
        ]  # fmt: skip
        return listing("pool", served, data, [o.prompt_token_ids for o in outs])

    async def classify(request: Request):
        if task != "classify":
            refuse("/classify", "a classification model")
        body = await parse(request, ClassificationRequest)
        served = check_model(body.model)
        prompts = prepared(body.prompts(messages_of), body.add_special_tokens)
        params = PoolingParams(
            "classify", activation=body.activation, truncate_prompt_tokens=truncation(body)
        )
        outs = await run(request, "classify", prompts, params, "input")
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.data.flatten()
            label = labels[int(probs.argmax())] if probs.numel() == len(labels) else None
            data.append(
                {"index": i, "label": label, "probs": probs.tolist(), "num_classes": len(probs)}
            )
        return listing("classify", served, data, [o.prompt_token_ids for o in outs])

    async def pair_prompts(pairs: list[tuple[str, str]], keep: int | None) -> list[dict]:
        a, b = [p[0] for p in pairs], [p[1] for p in pairs]
        cut = (
            {}
            if keep is None
            else {"truncation": True, "max_length": truncate_length(keep, max_model_len)}
        )
        # one batched call off the event loop (the fast tokenizer releases the GIL)
        enc = await asyncio.to_thread(tokenizer, a, text_pair=b, **cut)
        types = enc.get("token_type_ids")
        return [
            {"prompt_token_ids": list(ids)}
            | ({"token_type_ids": list(types[i])} if types is not None else {})
            for i, ids in enumerate(enc["input_ids"])
        ]

    async def pair_scores(request: Request, endpoint: str, first: list[str], second: list[str],
                          where: tuple[str, str], body: Any, given: tuple[Any, Any]
                          ) -> tuple[list[float], list[list[int]]]:  # fmt: skip
        """Per pair: its score and the prompt tokens it took. A cross-encoder runs each pair
        (errors name the second text); an embedding model embeds every text once (errors name
        the text) and returns the cosine similarity of each pair's embeddings."""
        try:
            pairs = score_pairs(first, second, where)
        except InvalidInputError as exc:
            raise RequestError(str(exc), where[0]) from None
        if task == "embed":
            fields = [
                f"{name}[{i}]" if isinstance(value, list) else name
                for name, value, items in zip(where, given, (first, second))
                for i in range(len(items))
            ]
            params = PoolingParams("embed", truncate_prompt_tokens=truncation(body))
            outs = await run(request, endpoint, first + second, params, fields)
            pad = getattr(tokenizer, "pad_token_id", None)
            scored = cosine_scores(outs[: len(first)], outs[len(first) :], pad)
            return [o.outputs.score for o in scored], [o.prompt_token_ids for o in scored]
        keep = truncation(body)
        prompts = await pair_prompts(pairs, keep)
        params = PoolingParams("classify", activation=body.activation, truncate_prompt_tokens=keep)
        outs = await run(request, endpoint, prompts, params, where[1])
        return [float(o.outputs.data.flatten()[0]) for o in outs], [
            o.prompt_token_ids for o in outs
        ]

    async def score(request: Request):
        if not scorer:
            refuse(request.url.path, not_scorer)
        body = await parse(request, ScoreRequest)
        served = check_model(body.model)
        first, second = texts(body.text_1, "text_1"), texts(body.text_2, "text_2")
        scores, tokens = await pair_scores(
            request, "score", first, second, ("text_1", "text_2"), body,
            (body.text_1, body.text_2),
        )  # fmt: skip
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return listing("score", served, data, tokens)

    async def rerank(request: Request):
        if not scorer:
            refuse(request.url.path, not_scorer)
        body = await parse(request, RerankRequest)
        served = check_model(body.model)
        query = texts(body.query, "query", many=False)
        documents = texts(body.documents, "documents")
        if body.top_n is not None and body.top_n < 0:
            raise RequestError("top_n: must be >= 0 (0: every document)", "top_n")
        scores, prompt_tokens = await pair_scores(
            request, "rerank", query, documents, ("query", "documents"), body,
            (body.query, body.documents),
        )  # fmt: skip
        results = [{"index": i, "relevance_score": s} for i, s in enumerate(scores)]
        if body.return_documents:
            for result in results:
                result["document"] = {"text": documents[result["index"]]}
        results.sort(key=lambda r: -r["relevance_score"])
        if body.top_n:
            results = results[: body.top_n]
        tokens = sum(len(t) for t in prompt_tokens)
        return {"id": new_id("rerank"), "model": served, "usage": {"total_tokens": tokens},
                "results": results}  # fmt: skip

    routes = {
        "/v1/embeddings": embeddings, "/pooling": pooling, "/classify": classify,
        "/score": score, "/v1/score": score, "/rerank": rerank, "/v1/rerank": rerank,
    }  # fmt: skip
    for path in POOLING_ROUTES:
        router.add_api_route(path, routes[path], methods=["POST"])


async def parse(request: Request, model: type[BaseModel]) -> Any:
    """The request's JSON body as `model` (validated after the route's task check, so a
    model that cannot serve the route says so whatever the body holds)."""
    try:
        raw = await request.json()
    except ValueError:
        raise RequestError("the request body is not valid JSON", None, "invalid_json") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def pool_prompts(
    request: Request,
    engine: AsyncEngine,
    prompts: list,
    params: PoolingParams,
    field: str | list[str],
) -> list[PoolingRequestOutput]:
    """Submit every prompt at once (the engine batches them), wait for all; a refused prompt
    is a RequestError naming `field` (and its index when there are several; a list: each
    prompt's own name). A client that disconnects has its requests aborted."""
    ids = [engine.submit(p, params) for p in prompts]
    watcher = asyncio.create_task(_abort_on_disconnect(request, engine, ids))

    async def final(request_id: str) -> PoolingRequestOutput | None:
        out = None
        async for out in engine.stream(request_id):  # noqa: B007 - one final output
            pass
        return out

    try:
        results = await asyncio.gather(*(final(i) for i in ids), return_exceptions=True)
    finally:
        watcher.cancel()
        for request_id in ids:
            engine.abort(request_id)  # a no-op when it finished
    for i, result in enumerate(results):
        if isinstance(field, list):
            where = field[i]
        else:
            where = f"{field}[{i}]" if len(prompts) > 1 else field
        if isinstance(result, InvalidInputError):
            raise RequestError(f"{where}: {result}", where) from None
        if isinstance(result, BaseException):
            raise RuntimeError(f"engine error on {where}: {result}") from result
        if result is None:  # aborted: the client went away
            raise RequestError("the request was aborted", None, "aborted", status=499)
    return results


def encoded(data: torch.Tensor, encoding_format: str) -> Any:
    """A pooled tensor as JSON: nested floats, or base64 of its float32 little-endian bytes
    (OpenAI's `encoding_format: "base64"`)."""
    data = data.float()
    if encoding_format == "base64":
        return base64.b64encode(data.numpy().astype("<f4").tobytes()).decode()
    return data.tolist()


def listing(prefix: str, model: str, data: list, prompt_tokens: list[list[int]]) -> dict:
    """vLLM's pooling response: `{id, object: "list", created, model, data, usage}`."""
    tokens = sum(len(t) for t in prompt_tokens)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    return {"id": new_id(prefix), "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": usage}  # fmt: skip
