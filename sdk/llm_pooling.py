"""`LLM.encode` / `embed` / `classify` / `reward` / `score` (vLLM's names): pooling requests
through the engine of a pooling model (registry task classify, reward or embed)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError, PolymodalError
from polymodal.llm_core.pooling import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingParams,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from polymodal.llm_prompts import as_batch, is_messages
from polymodal.processors.types import ProcessedPrompt


def split_token_types(prompt: Any) -> tuple[Any, list[int] | None]:
    """A pooling prompt without its `token_type_ids` (BERT's segment ids, which the prompt
    processor does not know), and those ids (None when not given)."""
    if isinstance(prompt, dict) and "token_type_ids" in prompt:
        rest = {k: v for k, v in prompt.items() if k != "token_type_ids"}
        return rest, prompt["token_type_ids"]
    return prompt, None


def pooling_prompt(llm, prompt: Any, params: PoolingParams) -> tuple[Any, list[int] | None]:
    """One pooling prompt processed (`ProcessedPrompt`) and its segment ids (None: not given).
    A text prompt is lower-cased first when the checkpoint's sentence_bert_config.json says
    `do_lower_case`, and with `truncate_prompt_tokens` the tokenizer cuts it (on its truncation
    side, special tokens kept: sentence-transformers' tokens); the engine cuts token ids. Chat
    messages are rendered by the template without opening an assistant turn unless a
    `{"messages": ..., "add_generation_prompt": True}` prompt asks."""
    prompt, token_types = split_token_types(prompt)
    if is_messages(prompt):  # one conversation: no assistant turn opened (vLLM's default)
        prompt = {"messages": list(prompt), "add_generation_prompt": False}
    text = prompt if isinstance(prompt, str) else None
    if isinstance(prompt, dict) and set(prompt) == {"prompt"}:
        text = prompt["prompt"]
    if not isinstance(text, str):
        return llm.process(prompt), token_types
    if llm.model_config.do_lower_case:
        text = text.lower()
    keep = params.truncate_prompt_tokens
    if keep is None or llm.tokenizer is None:
        return llm.process(text), token_types
    max_length = truncate_length(keep, llm.engine.max_model_len)
    ids = llm.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return ProcessedPrompt(list(ids), None, 0), token_types


def truncate_length(truncate_prompt_tokens: int, max_model_len: int) -> int:
    """The tokens a prompt keeps under `truncate_prompt_tokens` (-1: max_model_len)."""
    return max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens


def pool(
    llm,
    prompts: Any,
    params: PoolingParams | None,
    task: str,
    truncate_prompt_tokens: int | None = None,
) -> list[PoolingRequestOutput]:
    """Run `prompts` (one or a list: strings, token ids, chat messages, or dicts with `prompt` /
    `prompt_token_ids` / `messages` and optional `token_type_ids`) as pooling requests of
    `task`; outputs in input order. `truncate_prompt_tokens` (vLLM's keyword) overrides the
    params' own. Every prompt is checked before any runs (errors name its index)."""
    params = replace(params or PoolingParams(), task=task)
    if truncate_prompt_tokens is not None:
        params = replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
    batch = as_batch(prompts)
    queued = []
    for i, prompt in enumerate(batch):
        try:
            queued.append(pooling_prompt(llm, prompt, params))
        except PolymodalError as exc:
            raise type(exc)(f"prompt {i}: {exc}") from exc
    if any(p.mm_items or p.positions is not None for p, _ in queued):  # media: one by one
        prompts, types = [p for p, _ in queued], [t for _, t in queued]
        return llm.run(llm.engine.add_each(prompts, params, types, processed=True))
    # one batch: checked whole (a bad prompt raises naming its index, nothing queued)
    token_ids = [p.token_ids for p, _ in queued]
    token_types = [types for _, types in queued]
    ids = llm.engine.add_requests(token_ids, params, token_type_ids=token_types)
    return llm.run(ids)


def as_classification(out: PoolingRequestOutput) -> ClassificationRequestOutput:
    probs = ClassificationOutput(out.outputs.data.flatten().tolist())
    return ClassificationRequestOutput(out.request_id, out.prompt_token_ids, probs)


def as_embedding(out: PoolingRequestOutput) -> EmbeddingRequestOutput:
    vector = EmbeddingOutput(out.outputs.data.flatten().tolist())
    return EmbeddingRequestOutput(out.request_id, out.prompt_token_ids, vector)


def as_score(out: PoolingRequestOutput) -> ScoringRequestOutput:
    score = ScoringOutput(float(out.outputs.data.flatten()[0]))
    return ScoringRequestOutput(out.request_id, out.prompt_token_ids, score)


# ---- scoring text pairs (cross-encoders, embedding models) -------------------------------
def is_cross_encoder(task: str, num_labels: int | None) -> bool:
    """A model that scores text pairs: a sequence classifier with one label (vLLM's rule)."""
    return task == "classify" and num_labels == 1


def check_scorer(task: str, num_labels: int | None, model: str) -> None:
    """Raise InvalidInputError naming `model` unless it scores text pairs: a cross-encoder, or
    an embedding model (cosine similarity)."""
    if task != "embed" and not is_cross_encoder(task, num_labels):
        kind = f"a {task} model" if task != "classify" else f"a {num_labels}-label classifier"
        raise InvalidInputError(
            f"scoring is not supported by {model}: it is {kind}, not a cross-encoder "
            "(a sequence classifier with one label) nor an embedding model"
        )


def cosine_scores(
    first: list[PoolingRequestOutput],
    second: list[PoolingRequestOutput],
    pad_token_id: int | None,
) -> list[ScoringRequestOutput]:
    """vLLM's score for embedding models: the cosine similarity of each pair's embeddings
    (`first` has one output, paired with every one of `second`, or as many). The pair's
    prompt_token_ids are both prompts joined by the pad token, as vLLM reports them."""
    if len(first) == 1:
        first = first * len(second)
    pad = [] if pad_token_id is None else [pad_token_id]
    outs = []
    for a, b in zip(first, second):
        cos = torch.nn.functional.cosine_similarity(a.outputs.data, b.outputs.data, dim=0)
        tokens = a.prompt_token_ids + pad + b.prompt_token_ids
        request_id = f"{a.request_id}_{b.request_id}"
        outs.append(ScoringRequestOutput(request_id, tokens, ScoringOutput(float(cos))))
    return outs


def score_pairs(text_1: Any, text_2: Any, where: tuple[str, str] = ("text_1", "text_2")):
    """vLLM's pairing of `score(text_1, text_2)`: one against one, one against many, or many
    against as many (pairwise). Returns [(a, b), ...]; errors name the argument."""
    first = [text_1] if isinstance(text_1, str) else list(text_1)
    second = [text_2] if isinstance(text_2, str) else list(text_2)
    for name, texts in zip(where, (first, second)):
        if not texts:
            raise InvalidInputError(f"{name}: give at least one text")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInputError(f"{name}: a string or a list of strings")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise InvalidInputError(
            f"{where[0]} has {len(first)} texts and {where[1]} {len(second)}: give one "
            f"{where[0]}, or as many as {where[1]}"
        )
    return list(zip(first, second))


def pair_prompt(
    tokenizer: Any, text_1: str, text_2: str, max_length: int | None = None
) -> dict[str, Any]:
    """One cross-encoder prompt: the tokenizer's pair encoding (BERT: [CLS] a [SEP] b [SEP])
    with its segment ids, as vLLM builds it; `max_length`: cut to that many tokens (the longer
    text first, special tokens kept)."""
    enc = tokenizer(
        text=text_1, text_pair=text_2, truncation=bool(max_length), max_length=max_length
    )
    prompt = {"prompt_token_ids": list(enc["input_ids"])}
    if enc.get("token_type_ids") is not None:
        prompt["token_type_ids"] = list(enc["token_type_ids"])
    return prompt


def score(
    llm, text_1: Any, text_2: Any, params: PoolingParams | None, truncate: int | None = None
) -> list:
    """`LLM.score`: per text pair (`ScoringRequestOutput`), a cross-encoder's relevance score
    or an embedding model's cosine similarity (each text embedded once); `truncate`: the
    `truncate_prompt_tokens` of each prompt (a pair, or a text)."""
    text = llm.model_config.text_config
    check_scorer(llm.engine.task, getattr(text, "num_labels", None), llm.model_name)
    if llm.tokenizer is None:
        raise InvalidInputError("LLM.score needs a tokenizer (skip_tokenizer_init is set)")
    if llm.engine.task == "embed":
        score_pairs(text_1, text_2)  # the pairing's errors, before anything runs
        first = [text_1] if isinstance(text_1, str) else list(text_1)
        second = [text_2] if isinstance(text_2, str) else list(text_2)
        outs = pool(llm, first + second, params, "embed", truncate)
        pad = getattr(llm.tokenizer, "pad_token_id", None)
        return cosine_scores(outs[: len(first)], outs[len(first) :], pad)
    max_length = None if truncate is None else truncate_length(truncate, llm.engine.max_model_len)
    pairs = score_pairs(text_1, text_2)
    prompts = [pair_prompt(llm.tokenizer, a, b, max_length) for a, b in pairs]
    return [as_score(o) for o in pool(llm, prompts, params, "classify", truncate)]
