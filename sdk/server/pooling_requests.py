"""Request bodies of vLLM's pooling routes (`/v1/embeddings`, `/pooling`, `/classify`,
`/score`, `/rerank`), validated strictly like the generation requests: a field this server
does not implement is a 400 naming it. `docs/serving.md` lists the fields;
`tests/sdk/test_compat_table.py` keeps that table and these models in step.

`input` is checked here, not by pydantic's unions, so that a wrong type gets one clear
message naming `input` (or `input[i]`) instead of one line per union member.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from polymodal.server.errors import RequestError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _InputRequest(_Strict):
    """The fields every pooling route with an `input` shares."""

    model: str | None = None
    input: Any = None
    user: str | None = None  # metadata, not used (as in vLLM)
    add_special_tokens: bool = True

    def prompts(self) -> list[str | list[int]]:
        """`input` as a list of prompts: one string, strings, token ids or token-id lists."""
        return input_prompts(self.input, "input")


class EmbeddingRequest(_InputRequest):
    """OpenAI's `POST /v1/embeddings` (+ vLLM's `normalize`, `add_special_tokens`)."""

    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None


class PoolingRequest(_InputRequest):
    """vLLM's `POST /pooling`: the model's pooled output as raw `data`. `task` "encode" is the
    head's raw output; the default is the model's own task (classify: probabilities, reward:
    rewards). `activation` / `normalize` switch the task's activation / L2 norm."""

    encoding_format: Literal["float", "base64"] = "float"
    task: Literal["encode", "embed", "classify", "reward"] | None = None
    activation: bool | None = None
    normalize: bool | None = None


class ClassificationRequest(_InputRequest):
    """vLLM's `POST /classify`: class probabilities and the top label per input."""

    activation: bool | None = None


class ScoreRequest(_Strict):
    """vLLM's `POST /score`: `text_1` (one text or a list) against `text_2` (one or a list)."""

    model: str | None = None
    text_1: Any = None
    text_2: Any = None
    user: str | None = None
    activation: bool | None = None


class RerankRequest(_Strict):
    """vLLM's (Jina / Cohere-style) `POST /rerank`: documents ordered by relevance to `query`;
    `top_n` keeps the best n (0 or unset: all)."""

    model: str | None = None
    query: Any = None
    documents: Any = None
    top_n: int | None = None
    user: str | None = None
    activation: bool | None = None


def input_prompts(value: Any, field: str) -> list[str | list[int]]:
    """A string, a list of strings, token ids or a list of token-id lists -> a list of
    prompts (strings or token-id lists); a 400 naming `field` otherwise."""
    if isinstance(value, str):
        items: list[Any] = [value]
        names = [field]
    elif isinstance(value, list) and value and all(_is_id(v) for v in value):
        items, names = [value], [field]
    elif isinstance(value, list):
        items, names = value, [f"{field}[{i}]" for i in range(len(value))]
    else:
        raise RequestError(
            f"{field}: give a string, a list of strings, token ids or a list of token-id lists "
            f"(got {'nothing' if value is None else type(value).__name__})",
            field,
        )
    if not items:
        raise RequestError(f"{field}: the list is empty; give at least one input", field)
    for item, name in zip(items, names):
        if isinstance(item, str):
            if not item:
                raise RequestError(f"{name}: the text is empty", name)
        elif isinstance(item, list):
            if not item:
                raise RequestError(f"{name}: the token-id list is empty", name)
            if not all(_is_id(t) for t in item):
                raise RequestError(f"{name}: token ids must be integers", name)
        else:
            raise RequestError(
                f"{name}: a string or a list of token ids, got {type(item).__name__}", name
            )
    return items


def texts(value: Any, field: str, many: bool = True) -> list[str]:
    """One text (or, with `many`, a non-empty list of them); a 400 naming `field` otherwise."""
    items = value if many and isinstance(value, list) else [value]
    if not items:
        raise RequestError(f"{field}: the list is empty; give at least one text", field)
    for i, item in enumerate(items):
        name = f"{field}[{i}]" if many and isinstance(value, list) else field
        if not isinstance(item, str):
            want = "a string or a list of strings" if many else "a string"
            got = "nothing" if item is None else type(item).__name__
            raise RequestError(f"{name}: {want}, got {got}", name)
        if not item:
            raise RequestError(f"{name}: the text is empty", name)
    return items


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
