"""vLLM's tokenizer routes: `POST /tokenize` (a raw `prompt`, or chat `messages` rendered by
the chat template with their media expanded into the model's placeholder tokens) and
`POST /detokenize` (token ids back to text, ids outside the vocab refused)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from polymodal.async_engine import AsyncEngine
from polymodal.server.errors import RequestError
from polymodal.server.requests import DetokenizeRequest, TokenizeRequest


def add_token_routes(
    router: APIRouter,
    engine: AsyncEngine,
    check_model: Callable[[str | None], str],
    messages_of: Callable[[list], list],
    chat_template: str | None,
) -> None:
    """`messages_of`: a request's messages as the engine takes them (media policy checked);
    `chat_template`: the server's own, when a request names none."""
    tokenizer = engine.tokenizer

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("give exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            prompt = {
                "messages": messages_of(body.messages),
                "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()] or None,
                "chat_template": body.chat_template or chat_template,
                "chat_template_kwargs": body.chat_template_kwargs,
                "add_generation_prompt": body.add_generation_prompt,
                "continue_final_message": body.continue_final_message,
                "mm_processor_kwargs": body.mm_processor_kwargs,
            }
            ids = (await engine.process(prompt)).token_ids
        out = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        vocab = engine.model_info["vocab_size"]
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocab [0, {vocab})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}
