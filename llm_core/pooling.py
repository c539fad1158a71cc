"""The pooling task: `PoolingParams` (vLLM's names), poolers, pooled outputs, and the engine's
pooling step.

A pooling model (`SupportsPooling`, registry task classify / reward / embed) runs each prompt
once and returns tensors instead of tokens: the pooling step (pooling_step.py) keeps each
prompt's hidden states until its last chunk ran (non-causal models are never chunked), then
the model pools them (CLS, last, mean, all tokens, or the tokens that end a step) and applies
its head. Prefix caching is off for pooling models (a cached prefix has no hidden states to
pool).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

import torch

from polymodal.llm_core.errors import InvalidInputError

POOLING_TASKS = ("encode", "embed", "classify", "reward", "token_embed", "token_classify")
#: per-token tasks a model serves beside its own (`SupportsPooling.token_task_files`)
TOKEN_TASKS = ("token_embed", "token_classify")


@dataclass
class PoolingParams:
    """What a pooling request returns.

    `task`: "encode" (the head's raw output), "embed", "classify" or "reward"; None = the
    model's own task. "token_embed" / "token_classify": one vector / one score per token, from
    a model that has such heads (bge-m3: its ColBERT vectors / lexical weights). `normalize`
    (embed, token_embed): L2-normalize, default True. `activation`: classify: softmax over the
    labels (sigmoid for one label); step rewards: softmax per step; token_classify: bge-m3's
    ReLU; default True. `step_tag_id`: the token that ends a step (step pooling; default: the
    model's).
    `dimensions` (embed): keep the first n features, then normalize (a Matryoshka model's
    smaller vectors). `truncate_prompt_tokens`: a longer prompt keeps only k tokens, cut on the
    tokenizer's truncation side (right: the beginning stays, as sentence-transformers and vLLM's
    pooling runner cut; a text prompt keeps its special tokens); -1: max_model_len.
    """

    task: str | None = None
    normalize: bool | None = None
    activation: bool | None = None
    step_tag_id: int | None = None
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in POOLING_TASKS:
            raise InvalidInputError(
                f"pooling task must be one of {POOLING_TASKS}, got {self.task!r}"
            )
        keep = self.truncate_prompt_tokens
        if keep is not None and (
            isinstance(keep, bool) or not isinstance(keep, int) or (keep < 1 and keep != -1)
        ):
            raise InvalidInputError(
                f"truncate_prompt_tokens must be a positive integer or -1 (max_model_len), "
                f"got {keep!r}"
            )


class Pooler(enum.Enum):
    """Which hidden rows of a prompt a model's head reads."""

    CLS = "cls"  # the first token
    LAST = "last"  # the last token
    MEAN = "mean"  # the mean over all tokens
    ALL = "all"  # every token
    STEP = "step"  # the tokens equal to the step tag (process rewards)


def pool_rows(
    pooler: Pooler, hidden: torch.Tensor, token_ids: list[int], step_tag_id: int | None = None
) -> torch.Tensor:
    """The rows of one prompt's `hidden [num_tokens, hidden]` that `pooler` keeps:
    `[hidden]` for CLS / LAST / MEAN, `[rows, hidden]` for ALL / STEP."""
    if pooler is Pooler.CLS:
        return hidden[0]
    if pooler is Pooler.LAST:
        return hidden[-1]
    if pooler is Pooler.MEAN:
        return hidden.float().mean(0).to(hidden.dtype)
    if pooler is Pooler.ALL:
        return hidden
    if step_tag_id is None:
        raise InvalidInputError("step pooling needs a step_tag_id (PoolingParams.step_tag_id)")
    steps = torch.tensor(token_ids, device=hidden.device) == step_tag_id
    return hidden[steps]


class PromptRows(list):
    """Per prompt of a step, its hidden rows `[num_tokens, hidden]`: views of `flat`, the step's
    hidden states, prompts one after another from row 0; `starts` (int32 `[prompts + 1]`, on
    `flat`'s device) are their cumulative lengths, so `pooled_rows` gathers every prompt's
    first or last row in one op. The whole-prompt step builds it (pooling_step.py); a plain
    list of rows pools the same."""

    def __init__(self, flat: torch.Tensor, starts: torch.Tensor, lens: list[int]):
        super().__init__(flat.split(lens))
        self.flat, self.starts = flat, starts


def pooled_rows(pooler: Pooler, hidden: list[torch.Tensor], prompts: list) -> torch.Tensor:
    """`pool_rows` of every prompt (CLS / LAST / MEAN) stacked: `[prompts, hidden]`; from
    `PromptRows`, CLS and LAST are one gather instead of one op per prompt."""
    starts = getattr(hidden, "starts", None)
    if starts is not None and pooler is Pooler.CLS:
        return hidden.flat.index_select(0, starts[:-1])
    if starts is not None and pooler is Pooler.LAST:
        return hidden.flat.index_select(0, starts[1:] - 1)
    return torch.stack([pool_rows(pooler, h, p.token_ids) for h, p in zip(hidden, prompts)])


@dataclass
class PoolingInput:
    """One finished prompt for `SupportsPooling.pool`: its token ids and resolved params."""

    token_ids: list[int]
    params: PoolingParams


def check_pooling_request(
    params, task: str, architecture: str, model_dir=None
) -> PoolingParams | None:
    """The request's params checked against the model's task (`ModelRow.task`): a generation
    request to a pooling model and the reverse raise InvalidInputError naming both. A per-token
    task ("token_embed", "token_classify") needs the model class's head for it
    (`token_task_files`) and that head's file in `model_dir`; the error names what is missing.
    Returns the PoolingParams (defaults filled) of a pooling request, None for a generation
    request."""
    is_pooling = isinstance(params, PoolingParams)
    if task == "generate":
        if is_pooling:
            raise InvalidInputError(
                f"{architecture} is a generation model (task 'generate'): it takes "
                f"SamplingParams, not a pooling request (task {params.task!r})"
            )
        return None
    if params is not None and not is_pooling:
        raise InvalidInputError(
            f"{architecture} is a pooling model (task {task!r}): it does not generate text; "
            f"use LLM.{task} or LLM.encode (PoolingParams)"
        )
    params = params or PoolingParams()
    wanted = params.task or task
    if wanted in TOKEN_TASKS:
        check_token_task(wanted, task, architecture, model_dir)
    elif wanted not in ("encode", task):
        raise InvalidInputError(
            f"{architecture} serves the pooling task {task!r} (and 'encode'), not {wanted!r}"
        )
    if params.dimensions is not None and wanted != "embed":
        raise InvalidInputError(f"dimensions applies to task 'embed', not {wanted!r}")
    return replace(params, task=wanted)


def check_token_task(wanted: str, task: str, architecture: str, model_dir) -> None:
    """InvalidInputError unless `architecture` (served for `task`) has a head for the per-token
    task `wanted` and its file is in `model_dir`."""
    from pathlib import Path

    from polymodal.llm_core.registry import model_class

    files = getattr(model_class(architecture, task), "token_task_files", {})
    if wanted not in files:
        raise InvalidInputError(
            f"{architecture} serves the pooling task {task!r} (and 'encode'), not {wanted!r}: "
            "it has no per-token head"
        )
    if model_dir is not None and not (Path(model_dir) / files[wanted]).is_file():
        raise InvalidInputError(
            f"task {wanted!r} needs {files[wanted]} (the checkpoint's {wanted} head), which "
            f"{model_dir} does not have"
        )


def finish_pooled(head_output: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    """The head's output for one prompt, as its task returns it: classify -> probabilities,
    embed -> L2-normalized, reward / encode -> as is (step rewards: see the model)."""
    out = head_output.float()
    if params.task == "classify" and params.activation is not False:
        return out.sigmoid() if out.shape[-1] == 1 else out.softmax(-1)
    if params.task == "embed" and params.normalize is not False:
        return torch.nn.functional.normalize(out, dim=-1)
    return out


def finish_pooled_rows(
    head_output: torch.Tensor, prompts: list
) -> torch.Tensor | list[torch.Tensor]:
    """`finish_pooled` of each row of `head_output [prompts, features]` with its prompt's
    params: rows whose params finish alike (the usual batch) in one op, returned as one
    tensor `[prompts, features]`; otherwise one tensor per row."""
    first = prompts[0].params
    key = (first.task, first.activation, first.normalize)
    if all((p.params.task, p.params.activation, p.params.normalize) == key for p in prompts):
        return finish_pooled(head_output, first)
    return [finish_pooled(row, p.params) for row, p in zip(head_output, prompts)]


# ---- outputs (vLLM's shapes) --------------------------------------------------------------
@dataclass
class PoolingOutput:
    """A pooled tensor (on the host)."""

    data: torch.Tensor


@dataclass
class PoolingRequestOutput:
    """The result of one pooling request (always finished)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    finished: bool = True


@dataclass
class ClassificationOutput:
    """Class probabilities of one prompt."""

    probs: list[float]


@dataclass
class ClassificationRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True


@dataclass
class EmbeddingOutput:
    """The embedding vector of one prompt."""

    embedding: list[float] = field(default_factory=list)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class ScoringOutput:
    """The relevance score of one text pair (a cross-encoder's probability)."""

    score: float


@dataclass
class ScoringRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
    finished: bool = True
