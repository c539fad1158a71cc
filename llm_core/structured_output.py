"""Structured output with xgrammar: `StructuredOutputsParams` -> a compiled grammar -> one
matcher per sequence that fills the sampler's token bitmask and follows the sampled tokens.

Why xgrammar: vLLM and SGLang use it (so its JSON-schema coverage is what their users expect),
it ships CPU wheels on PyPI for the Pythons we support, and its matcher fills a 152k-token
mask in microseconds from a precompiled automaton. Compilation runs where the request is
processed (a worker thread in the server), never on the engine loop; the mask is applied to
the logits on their device (`logit_rules`).

With a reasoning parser (`EngineConfig.reasoning_parser`, vLLM's), a grammar waits for the
reasoning to end: the sequence thinks freely until it samples the end token (`</think>`), and
the grammar holds from the next token on (`WaitingGrammar`). A prompt that already closed its
thinking (Qwen3's template with thinking off writes `<think></think>`) starts constrained.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import StructuredOutputsParams

# Most whitespace characters between two JSON tokens. Deep pretty-printing fits; a model that
# would otherwise pad with spaces or newlines forever (a known failure) must move on.
JSON_MAX_WHITESPACE = 64


def _xgrammar():
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - xgrammar is a core dependency
        raise InvalidInputError(
            "structured output needs the xgrammar package: pip install xgrammar"
        ) from exc
    return xgrammar


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer (thread-safe; xgrammar caches
    compiled grammars by their source)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """An xgrammar `CompiledGrammar`; a bad schema / regex / grammar raises
        `InvalidInputError` naming `structured_outputs.<kind>`."""
        kind = spec.kind
        try:
            with self._lock:
                return self._compile(spec, kind)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise InvalidInputError(
                f"SamplingParams.structured_outputs.{kind} cannot be compiled: {_reason(exc)}"
            ) from None

    def _compile(self, spec: StructuredOutputsParams, kind: str) -> Any:
        c = self._compiler
        if kind in ("json", "json_object"):
            schema = spec.json if kind == "json" else {"type": "object"}  # any object
            return c.compile_json_schema(
                schema if isinstance(schema, str) else json.dumps(schema),
                any_whitespace=not spec.disable_any_whitespace,
                max_whitespace_cnt=JSON_MAX_WHITESPACE,
                strict_mode=kind == "json",  # strict: no properties the schema does not name
            )
        if kind == "regex":
            return c.compile_regex(spec.regex)
        if kind == "structural_tag":
            return _structural_tag(c, spec.structural_tag)
        if kind == "choice":
            # JSON string literals are valid EBNF literals (same escapes)
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec.choice))
        return c.compile_grammar(spec.grammar)


def _structural_tag(compiler, tag: str | dict) -> Any:
    """A structural tag compiled: xgrammar's form as is, the older `structures` + `triggers`
    form (vLLM's legacy `response_format`) as tags and triggers."""
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(tag, dict):
        raise ValueError("a structural tag is a JSON object")
    if "structures" not in tag:
        return compiler.compile_structural_tag(json.dumps(tag))
    xgr = _xgrammar()
    try:
        items = [
            xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
            for s in tag["structures"]
        ]
        triggers = list(tag["triggers"])
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"structures need begin, schema and end, and triggers a list of strings ({exc!r})"
        ) from None
    return compiler.compile_structural_tag(items, triggers)


# reasoning parser -> (the tag that opens the thinking, the one that ends it)
REASONING_TAGS = {"deepseek_r1": ("<think>", "</think>"), "qwen3": ("<think>", "</think>")}


@dataclass(frozen=True)
class WaitingGrammar:
    """A compiled grammar that holds only after the sequence samples `end_id`."""

    compiled: Any
    end_id: int


class Grammars:
    """A model's grammars for requests' `structured_outputs`: its `GrammarCompiler` is built
    on the first request that has one (xgrammar's tokenizer tables take a while).
    `reasoning_parser` (deepseek_r1, qwen3): grammars wait for the reasoning's end tag, whose
    token ids are looked up here (a tokenizer without them as single tokens: they hold from
    the first token, as without a parser, and a warning says so)."""

    def __init__(self, tokenizer: Any, model_config: Any, reasoning_parser: str | None = None):
        self._args = (tokenizer, model_config.vocab_size, model_config.eos_token_ids)
        self._compiler: GrammarCompiler | None = None
        self.tags = None if reasoning_parser is None else _tag_ids(tokenizer, reasoning_parser)

    def after_reasoning(self, compiled: Any, prompt_ids: list[int]) -> Any:
        """`compiled` as a request's sequences take it: waiting for the reasoning to end,
        unless there is no reasoning parser or the prompt closed its thinking already (its
        last end tag after its last start tag)."""
        if compiled is None or self.tags is None:
            return compiled
        start, end = self.tags
        closed = end in prompt_ids and (
            start not in prompt_ids or _last(prompt_ids, end) > _last(prompt_ids, start)
        )
        return compiled if closed else WaitingGrammar(compiled, end)

    def compile(self, spec: StructuredOutputsParams | None) -> Any:
        """`spec` compiled (None without one); `InvalidInputError` for a bad one, or when the
        model has no tokenizer (`skip_tokenizer_init`)."""
        if spec is None:
            return None
        if self._args[0] is None:
            raise InvalidInputError("structured_outputs need a tokenizer")
        if self._compiler is None:
            self._compiler = GrammarCompiler(*self._args)
        return self._compiler.compile(spec)


def _tag_ids(tokenizer: Any, parser: str) -> tuple[int, int] | None:
    """The token ids of `parser`'s start and end tags (None unless each is one token)."""
    if parser not in REASONING_TAGS:
        raise InvalidInputError(
            f"reasoning_parser {parser!r} is unknown; choose from {sorted(REASONING_TAGS)}"
        )
    if tokenizer is None:
        raise InvalidInputError("reasoning_parser needs a tokenizer (skip_tokenizer_init is set)")
    ids = []
    for tag in REASONING_TAGS[parser]:
        found = tokenizer.encode(tag, add_special_tokens=False)
        if len(found) != 1:
            logging.getLogger("polymodal").warning(
                "reasoning_parser %r: this tokenizer has no single token for %r: structured "
                "output holds from the first token (no room to think)", parser, tag,
            )  # fmt: skip
            return None
        ids.append(found[0])
    return ids[0], ids[1]


def _last(ids: list[int], token: int) -> int:
    return len(ids) - 1 - ids[::-1].index(token)


def _reason(exc: Exception) -> str:
    """xgrammar's message without its log prefix ("[time] file.cc:line: Check failed: ...")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text)
    text = re.sub(r"^Check failed: \(.*?\) is false:\s*", "", text)
    return text[:300]


class GrammarState:
    """One sequence's position in its grammar: fills bitmask rows, follows accepted tokens.
    Given a `WaitingGrammar`, every token is allowed (and none reaches the matcher) until the
    reasoning's end token is accepted."""

    def __init__(self, grammar: Any):
        waiting = isinstance(grammar, WaitingGrammar)
        self._wait_for = grammar.end_id if waiting else None
        self._matcher = _xgrammar().GrammarMatcher(grammar.compiled if waiting else grammar)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens the grammar allows next into int32 `bitmask[row]`."""
        if self._wait_for is not None:
            bitmask[row] = -1  # still thinking: every token
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it."""
        if self._wait_for is not None:
            if token_id == self._wait_for:
                self._wait_for = None  # the grammar holds from the next token
            return True
        return self._matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return self._wait_for is None and self._matcher.is_terminated()

    def legal_drafts(self, drafts: list[int]) -> int:
        """How many of `drafts` the grammar allows in a row from here (the state is kept)."""
        return self._walk(drafts)

    def draft_masks(self, drafts: list[int], masks: torch.Tensor) -> None:
        """Fill int32 `masks[j]` with the tokens allowed after `drafts[:j]`, j = 0..len(drafts)
        (the state is kept). Rows past a draft the grammar refuses repeat the last mask: their
        tokens are never kept (the refused draft is rejected before them)."""
        self._walk(drafts, masks)

    def _walk(self, drafts: list[int], masks: torch.Tensor | None = None) -> int:
        """Follow `drafts` from here (filling `masks` rows on the way, when given) and come
        back; returns how many the grammar allows in a row."""
        waiting, fed, allowed = self._wait_for, 0, 0
        for j in range(len(drafts) + 1):
            if masks is not None:
                if waiting is not None:
                    masks[j] = -1
                else:
                    self._matcher.fill_next_token_bitmask(masks, j)
            if j == len(drafts):
                break
            token = drafts[j]
            if waiting is not None:
                waiting = None if token == waiting else waiting
            elif self._matcher.is_terminated() or not self._matcher.accept_token(token):
                if masks is not None:
                    masks[j + 1 :] = masks[j]
                break
            else:
                fed += 1
            allowed += 1
        self._matcher.rollback(fed)
        return allowed


class DraftGrammar:
    """A sequence's grammar along its drafts for the rows of one step (`rows()[j]`: the state
    after drafts[:j]); the masks are filled once, on the first row's call."""

    def __init__(self, state: GrammarState, drafts: list[int]):
        self.state, self.drafts = state, drafts
        self.masks: torch.Tensor | None = None

    def rows(self) -> list[_DraftRow]:
        return [_DraftRow(self, j) for j in range(len(self.drafts) + 1)]


class _DraftRow:
    """One row's view of a `DraftGrammar`, shaped as a `GrammarState` for the sampler."""

    def __init__(self, grammar: DraftGrammar, index: int):
        self.grammar, self.index = grammar, index

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        g = self.grammar
        if g.masks is None:
            g.masks = torch.full((len(g.drafts) + 1, bitmask.shape[1]), -1, dtype=torch.int32)
            g.state.draft_masks(g.drafts, g.masks)
        bitmask[row] = g.masks[self.index]
