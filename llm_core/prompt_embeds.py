"""Prompts given as embeddings (vLLM's `prompt_embeds`; the engine needs
`enable_prompt_embeds=True`): `{"prompt_embeds": tensor [num_tokens, hidden_size]}` runs as
if those rows were the embeddings of a prompt's tokens, then generates as usual.

Such a prompt is one `PROMPT_EMBEDS` item over every position of a prompt of placeholder ids
(processors/prompt_embeds.py makes it): the runner writes the rows into the step's embeddings
as it does an image's encoder output (`media_inputs.slot_embeddings`), no encoder work is
booked, and the item's content hash keys its prefix-cache blocks. What reads prompt *tokens*
sees none: the repetition penalty counts the output only, the detokenizer starts from nothing,
the output's `prompt_token_ids` is None (vLLM's), and prompt logprobs are refused.
"""

from __future__ import annotations

import dataclasses

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.request import PROMPT_EMBEDS
from polymodal.llm_core.request_checks import kept_tokens
from polymodal.llm_core.sampling_params import SamplingParams


def check_given_embeds(engine, mm_items: list | None, params):
    """Check the rows a prompt brings instead of its encoders' (`data["embeds"]`: a prompt
    given as embeddings, images given as their tower's output) against `engine`'s model;
    returns the prompt's `PROMPT_EMBEDS` item, if it was given as embeddings."""
    mc, whole = engine.model_config, None
    for item in mm_items or ():
        if "embeds" not in item.data:
            continue
        width = item.data["embeds"].shape[1]
        if width != mc.hidden_size:
            name = "prompt_embeds" if item.modality == PROMPT_EMBEDS else f"{item.modality}_embeds"
            raise InvalidInputError(
                f"{name} have {width} columns but {mc.architecture}'s hidden size is "
                f"{mc.hidden_size}"
            )
        if item.modality == PROMPT_EMBEDS:
            whole = item
    if whole is not None:
        check_embeds_request(engine, whole, mm_items, params)
    return whole


def check_embeds_request(engine, item, mm_items: list, params) -> None:
    """Refuse a prompt given as embeddings that `engine` cannot run, naming why."""
    architecture = engine.model_config.architecture
    if not engine.config.enable_prompt_embeds:
        raise InvalidInputError(
            "prompt_embeds need an engine built with enable_prompt_embeds=True "
            "(serve: --enable-prompt-embeds)"
        )
    if len(mm_items) > 1:
        raise InvalidInputError("a prompt given as prompt_embeds carries no media")
    if not isinstance(params, SamplingParams):  # PoolingParams
        raise InvalidInputError("prompt_embeds go to generation, not to pooling requests")
    if any(spec.is_cross for spec in engine.scheduler.kv.specs):
        raise InvalidInputError(
            f"prompt_embeds: {architecture} is an encoder-decoder model; prompts given as "
            "embeddings go to decoder-only models"
        )
    if params.prompt_logprobs is not None:
        raise InvalidInputError("prompt_logprobs need prompt tokens: not with prompt_embeds")


def truncate_embeds(ids: list[int], item, keep: int, max_model_len: int) -> tuple[list[int], list]:
    """The last `keep` rows (-1: max_model_len - 1) of a prompt given as embeddings, as
    vLLM's left truncation (`truncate_prompt_tokens`): (ids, [its item])."""
    keep = kept_tokens(keep, max_model_len)
    if keep >= len(ids):
        return ids, [item]
    # the kept rows' key: a function of the whole rows' key and the cut, so equal inputs
    # cut alike share blocks and nothing else does
    rows = item.data["embeds"][-keep:]
    cut = dataclasses.replace(
        item, data={"embeds": rows}, num_slots=keep, content_hash=f"{item.content_hash}-{keep}"
    )
    return ids[-keep:], [cut]
