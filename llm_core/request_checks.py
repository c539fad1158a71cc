"""What `Engine.add_request` checks and derives before a request is queued: prompt and token-id
limits (a pooling prompt's included), `truncate_prompt_tokens`, `bad_words` as token sequences,
the scheduling priority, and a media request's atomic spans and cross-attention ranges."""

from __future__ import annotations

import dataclasses
from typing import Any

from polymodal.llm_core.embedding_head import check_dimensions, matryoshka_dimensions
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.interfaces import supports_multimodal
from polymodal.llm_core.request import CROSS_ATTENTION
from polymodal.llm_core.sampling_params import MAX_LOGPROBS, SamplingParams


def check_request(
    ids: list[int],
    params: SamplingParams,
    max_model_len: int,
    vocab_size: int,
    input_vocab_size: int | None = None,
    max_logprobs: int = MAX_LOGPROBS,
) -> None:
    """Raise `InvalidInputError` naming the input when the prompt or a token id does not fit.
    Prompt ids may reach `input_vocab_size` (default `vocab_size`): Mllama embeds its image
    token past the LM head's vocab.

    A `max_tokens` beyond what the context leaves ends the output at max_model_len (finish
    reason "length"), as in vLLM's `LLM`; servers reject it first (`check_max_tokens`).
    """
    if not ids:
        raise InvalidInputError("the prompt is empty: it needs at least one token")
    if len(ids) >= max_model_len:
        raise InvalidInputError(
            f"the prompt has {len(ids)} tokens but max_model_len is {max_model_len} "
            f"(prompt + at least one output token must fit)"
        )
    embeddable = input_vocab_size or vocab_size
    bad = out_of_range(ids, embeddable)
    if bad:
        raise InvalidInputError(
            f"prompt token ids {bad[:5]} are outside the vocab [0, {embeddable})"
        )
    room = max_model_len - len(ids)
    if params.min_tokens > room:
        raise InvalidInputError(
            f"SamplingParams.min_tokens={params.min_tokens} cannot fit: the prompt has "
            f"{len(ids)} tokens and max_model_len is {max_model_len}"
        )
    names = ("logit_bias", "allowed_token_ids", "stop_token_ids", "suppress_tokens",
             "begin_suppress_tokens")  # fmt: skip
    for name in names:
        outside = [t for t in getattr(params, name) or () if t >= vocab_size]
        if outside:
            raise InvalidInputError(
                f"SamplingParams.{name} has token ids {outside[:5]} outside the vocab "
                f"[0, {vocab_size})"
            )
    for name in ("logprobs", "prompt_logprobs"):
        n = getattr(params, name)
        if n is not None and n > min(max_logprobs, vocab_size):
            raise InvalidInputError(
                f"SamplingParams.{name}={n} is more than the engine allows: max_logprobs="
                f"{max_logprobs} (LLM(max_logprobs=...), serve --max-logprobs), vocab {vocab_size}"
            )
    rules = params.timestamp_rules
    if rules is not None and not rules.timestamp_begin < vocab_size > rules.eos_token_id:
        raise InvalidInputError(
            f"SamplingParams.timestamp_rules: no_timestamps_token_id "
            f"{rules.no_timestamps_token_id} and eos_token_id {rules.eos_token_id} must leave "
            f"the timestamps inside the vocab [0, {vocab_size})"
        )


def check_priority(priority: int, policy: str) -> None:
    """A request's `priority` other than 0 needs the engine's "priority" scheduling policy."""
    if priority != 0 and policy != "priority":
        raise InvalidInputError(
            f"priority={priority} needs scheduling_policy='priority' (the engine's is {policy!r})"
        )


def out_of_range(ids: list[int], size: int) -> list[int]:
    """The ids outside [0, size) (min / max first: a prompt in range costs no Python loop)."""
    if min(ids) >= 0 and max(ids) < size:
        return []
    return [t for t in ids if not 0 <= t < size]


def check_pooling_prompt(
    ids: list[int],
    params: Any,
    token_type_ids: list[int] | None,
    mm_items: list | None,
    model: Any,
    model_config: Any,
    max_model_len: int,
    budget: int,
    check_vocab: bool = True,
) -> None:
    """Raise `InvalidInputError` naming the input when a pooling prompt does not fit: text only,
    within max_model_len (no output token to leave room for) and the vocab (unless
    `check_vocab` is False: a batch checked at once), `params.dimensions` allowed by the model,
    a bidirectional model's prompt within one step's token `budget`, `token_type_ids` one per
    token inside the model's segment table."""
    if not ids:
        raise InvalidInputError("the prompt is empty: it needs at least one token")
    if len(ids) > max_model_len:
        raise InvalidInputError(
            f"the prompt has {len(ids)} tokens but max_model_len is {max_model_len} "
            "(truncate_prompt_tokens=-1 cuts it to max_model_len)"
        )
    vocab = model_config.vocab_size
    bad = out_of_range(ids, vocab) if check_vocab else []
    if bad:
        raise InvalidInputError(f"prompt token ids {bad[:5]} are outside the vocab [0, {vocab})")
    if mm_items and not supports_multimodal(model):
        raise InvalidInputError(
            f"pooling requests to {model_config.architecture} take text only (no media)"
        )
    if params.dimensions is not None:
        allowed, sizes = matryoshka_dimensions(model_config.text_config)
        check_dimensions(
            params.dimensions, allowed, sizes, model_config.architecture,
            model.embedding_dimension(),
        )  # fmt: skip
    if not model.is_causal and len(ids) > budget:
        raise InvalidInputError(
            f"the prompt has {len(ids)} tokens but a bidirectional model runs each prompt "
            f"whole in one step of max_num_batched_tokens={budget}"
        )
    if token_type_ids is not None:
        if len(token_type_ids) != len(ids):
            raise InvalidInputError(
                f"token_type_ids has {len(token_type_ids)} entries for {len(ids)} prompt tokens"
            )
        # an id past the model's segment table would fail the whole step on the device
        types = getattr(model_config.text_config, "type_vocab_size", None) or 1
        if not all(isinstance(t, int) and 0 <= t < types for t in token_type_ids):
            raise InvalidInputError(f"token_type_ids must be ints in [0, {types})")


def check_max_tokens(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> None:
    """Reject an explicitly set `max_tokens` that the context cannot hold (vLLM's server
    rule; a default max_tokens is cut at max_model_len instead)."""
    keep = params.truncate_prompt_tokens
    if keep is not None:
        num_prompt_tokens = min(num_prompt_tokens, max_model_len - 1 if keep == -1 else keep)
    room = max_model_len - num_prompt_tokens
    explicit = "max_tokens" in params.model_fields_set
    if explicit and params.max_tokens is not None and params.max_tokens > room:
        raise InvalidInputError(
            f"SamplingParams.max_tokens={params.max_tokens} is too large: this model's maximum "
            f"context length is {max_model_len} tokens and the prompt has {num_prompt_tokens}, "
            f"so at most {max(room, 0)} can be generated"
        )


def kept_tokens(keep: int, max_model_len: int) -> int:
    """A generation prompt's `truncate_prompt_tokens` as a count (-1: max_model_len - 1); one
    past max_model_len raises, as in vLLM (it could never be honoured)."""
    if keep > max_model_len:
        raise InvalidInputError(
            f"SamplingParams.truncate_prompt_tokens={keep} is greater than max_model_len="
            f"{max_model_len}: select a smaller truncation size (or -1: max_model_len - 1)"
        )
    return max_model_len - 1 if keep == -1 else keep


def truncate_prompt(
    ids: list[int],
    positions: list[list[int]] | None,
    mrope_delta: int,
    mm_items: list,
    keep: int,
    max_model_len: int,
) -> tuple[list[int], list[list[int]] | None, int, list]:
    """Keep the last `keep` prompt tokens (-1: max_model_len - 1), as vLLM's left truncation.

    Media slots must lie in the kept part (an image cannot be cut in half). Positions and
    slot starts are rebased so the result equals processing the kept tokens alone. A `keep`
    past max_model_len raises, as in vLLM (it could never be honoured).
    """
    keep = kept_tokens(keep, max_model_len)
    cut = len(ids) - keep
    if cut <= 0:
        return ids, positions, mrope_delta, mm_items
    first_media = min((item.slot_start for item in mm_items), default=None)
    if first_media is not None and first_media < cut:
        raise InvalidInputError(
            f"SamplingParams.truncate_prompt_tokens={keep} would cut into the prompt's "
            f"{mm_items[0].modality} (the prompt has {len(ids)} tokens and its media starts at "
            f"token {first_media}); keep at least {len(ids) - first_media} tokens"
        )
    if positions is not None:
        # Tokens before the first media item are text at position == index, so shifting
        # every position by `cut` gives the kept tokens' own positions from 0.
        positions = [[p - cut for p in row[cut:]] for row in positions]
    items = [dataclasses.replace(item, slot_start=item.slot_start - cut) for item in mm_items]
    return ids[cut:], positions, mrope_delta, items


def truncate_pooling_prompt(
    ids: list[int], token_type_ids: list[int] | None, keep: int, max_model_len: int, side: str
) -> tuple[list[int], list[int] | None]:
    """A pooling prompt (and its segment ids) cut to `keep` tokens (-1: max_model_len) on the
    tokenizer's truncation `side`: "right" keeps the beginning (sentence-transformers and vLLM's
    pooling runner), "left" the end. A `keep` past max_model_len raises, as in vLLM."""
    if keep > max_model_len:
        raise InvalidInputError(
            f"truncate_prompt_tokens={keep} is greater than max_model_len={max_model_len}: "
            "select a smaller truncation size (or -1: max_model_len)"
        )
    keep = max_model_len if keep == -1 else keep
    cut = slice(None, keep) if side != "left" else slice(-keep, None)
    return ids[cut], (None if token_type_ids is None else token_type_ids[cut])


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Each bad word as token ids, alone and after a space (vLLM's rule: the spaced form is
    kept when it tokenizes to a different first token and the same length)."""
    out: list[list[int]] = []
    for word in words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(bare)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return out


def atomic_spans(model, mm_items: list, budget: int) -> list[tuple[int, int]]:
    """The spans no step may cut: each embedded run of each item (an image, or one crop of it),
    when the model attends bidirectionally within them (`SupportsMultiModal.bidirectional_media`).
    A run longer than a step's token budget could never run: refused, naming the item and the
    budget."""
    if not mm_items or not getattr(model, "bidirectional_media", False):
        return []
    spans = []
    for index, item in enumerate(mm_items):
        for start, end in item.embed_runs():
            if end - start > budget:
                raise InvalidInputError(
                    f"media item {index + 1} ({item.modality}) has a run of {end - start} "
                    f"tokens that must run in one step, but max_num_batched_tokens is "
                    f"{budget}: raise it, or send a smaller {item.modality}"
                )
            spans.append((start, end))
    return sorted(spans)


def media_cross_ranges(
    model, cross_specs: list, architecture: str, mm_items: list, num_prompt_tokens: int
) -> list:
    """The encoder rows each token attends to (`SupportsMultiModal.cross_ranges`), for a
    request with cross-attention items; their rows must fit the model's cross cache
    (`cross_specs`: its cross-attention KV specs)."""
    items = [item for item in mm_items if item.target == CROSS_ATTENTION]
    if not items:
        return []
    rows = sum(item.num_embeds for item in items)
    if not cross_specs:
        raise InvalidInputError(
            f"{architecture} has no cross-attention layers for {items[0].modality} items of "
            f"target {CROSS_ATTENTION!r}"
        )
    if rows > cross_specs[0].max_rows:
        raise InvalidInputError(
            f"the request's {len(items)} {items[0].modality} item(s) bring {rows} encoder "
            f"rows; the model's cross-attention cache holds {cross_specs[0].max_rows} per "
            "request"
        )
    return model.cross_ranges(items, num_prompt_tokens)
