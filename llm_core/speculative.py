"""Speculative decoding by n-gram prompt lookup (vLLM's `speculative_config={"method": "ngram"}`).

Before a step, each decoding sequence looks for the last `n` tokens of its context (prompt and
output, `prompt_lookup_max` >= n >= `prompt_lookup_min`, longest first) earlier in the same
context; the tokens that followed the latest such match are its drafts (at most
`num_speculative_tokens`). The step then runs the last token and the drafts as one chunk and
samples a token at every position; a draft is accepted while the token sampled before it
agrees with it (`accepted`), so one step yields 1 to k + 1 tokens. KV written for rejected
drafts is simply overwritten later (`Request.num_computed_tokens` goes back).

Greedy outputs are exactly those of decoding without drafts. A sampled row accepts its draft
with the target probability of the draft and otherwise samples from the rest of the
distribution (the sampler's `drafts`): the output distribution is the target's, though not the
same random stream as without drafts (seeded requests give other, equally distributed tokens).

A request with a grammar (structured output) drafts only what its grammar allows in a row, and
each row is masked by the grammar's state after the drafts before it. A step that drafts runs
synchronously (a sequence's drafts follow its newest token); with `disable_by_batch_size`, the
steps of a larger batch draft nothing and keep async scheduling.

With a draft model (`{"method": "draft_model", "model": DIR}`), the drafts are that model's
greedy continuation instead (draft_model.py), with an EAGLE / EAGLE-3 head (`"method":
"eagle" | "eagle3"`) or DeepSeek-V3's MTP layer (`"mtp"`) the head's (eagle.py), with Medusa
heads (`"medusa"`) theirs (medusa.py); everything after the proposal is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.structured_output import DraftGrammar

METHODS = ("ngram", "draft_model", "eagle", "eagle3", "mtp", "deepseek_mtp", "medusa")
MTP_METHODS = ("mtp", "deepseek_mtp")  # the target's own MTP layer: no "model" needed
# vLLM's methods that draft with heads polymodal does not load
HEAD_METHODS = ("mlp_speculator",)
_NGRAM_KEYS = ("prompt_lookup_min", "prompt_lookup_max")
_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
         "disable_by_batch_size"}  # fmt: skip


@dataclass(frozen=True)
class SpeculativeConfig:
    """The proposer's settings (vLLM's keys and defaults): n-gram lookup, or a draft model."""

    num_speculative_tokens: int
    prompt_lookup_min: int = 5
    prompt_lookup_max: int = 5
    method: str = "ngram"
    # vLLM's: no drafts while more than this many requests are queued or running (those steps
    # keep async scheduling); None: always draft
    disable_by_batch_size: int | None = None
    # the draft model or EAGLE head (the other methods): a folder or a hub id
    model: str | None = None

    @classmethod
    def parse(cls, value: Any) -> SpeculativeConfig | None:
        """A config from vLLM's dict (or a SpeculativeConfig, or None); anything polymodal does
        not do raises `InvalidInputError` naming the key or the method."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise InvalidInputError(
                f"speculative_config must be a dict such as {{'method': 'ngram', "
                f"'num_speculative_tokens': 4}}, got {type(value).__name__}"
            )
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise InvalidInputError(
                f"speculative_config: {', '.join(unknown)} not supported (keys: {sorted(_KEYS)})"
            )
        model = value.get("model")
        method = value.get("method") or ("ngram" if model in ("ngram", "[ngram]")
                                         else "draft_model" if model else None)  # fmt: skip
        if method not in METHODS:
            why = " (heads polymodal does not run)"
            raise InvalidInputError(
                f"speculative_config method {method!r} is not supported: 'ngram' (prompt "
                f"lookup), 'draft_model' (a smaller model), 'eagle', 'eagle3' or 'medusa' (heads; "
                f"'model': their folder or hub id), 'mtp' / 'deepseek_mtp' (DeepSeek-V3's own "
                f"MTP layer){why if method in HEAD_METHODS else ''}"
            )
        if method in MTP_METHODS and model is None:
            pass  # the target checkpoint's own MTP layer
        elif method != "ngram" and (not isinstance(model, str) or not model):
            raise InvalidInputError(
                f"speculative_config method {method!r} needs 'model': the drafter's folder or "
                f"hub id, got {model!r}"
            )
        lookup = [key for key in _NGRAM_KEYS if key in value]
        if method != "ngram" and lookup:
            raise InvalidInputError(
                f"speculative_config {', '.join(lookup)}: n-gram settings, but the method is "
                f"{method!r}"
            )
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 64:
            raise InvalidInputError(
                f"speculative_config num_speculative_tokens must be an int in 1..64, got {k!r}"
            )
        lo, hi = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = 5
        lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
        for name, n in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise InvalidInputError(f"speculative_config {name} must be an int >= 1, got {n!r}")
        if lo > hi:
            raise InvalidInputError(
                f"speculative_config prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}"
            )
        limit = value.get("disable_by_batch_size")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 1):  # fmt: skip
            raise InvalidInputError(
                f"speculative_config disable_by_batch_size must be an int >= 1, got {limit!r}"
            )
        draft = model if method != "ngram" else None
        return cls(k, lo, hi, method, limit, draft)

    def room(self, req) -> int:
        """How many drafts `req`'s next step can check (none past max_tokens or the context)."""
        return min(
            self.num_speculative_tokens,
            (req.params.max_tokens or 1 << 62) - len(req.output_token_ids) - 1,
            req.max_model_len - req.num_tokens - 1,
        )

    def propose(self, req, vocab_size: int) -> list[int]:
        """N-gram drafts for `req`'s next step (none for a request that cannot take them); they
        end before an id the LM head cannot produce (an image token embedded past its vocab)."""
        room = self.room(req)
        if room <= 0:
            return []
        tokens = context_array(req)
        drafts = ngram_drafts(tokens, self.prompt_lookup_min, self.prompt_lookup_max, room)
        for i, token in enumerate(drafts):
            if token >= vocab_size:
                del drafts[i:]
                break
        if drafts and req.grammar is not None:  # only what the grammar allows in a row
            del drafts[req.grammar.legal_drafts(drafts) :]
        return drafts


def context_array(req) -> np.ndarray:
    """`req`'s known tokens as an array, kept on the request and extended by its new outputs
    (never converted whole again: a long prompt costs its copy once)."""
    known = req.num_known_tokens
    buf, filled = req.draft_context or (None, 0)
    if buf is None or buf.shape[0] < known:
        grown = np.empty(max(2 * known, 256), dtype=np.int64)
        if buf is None:
            grown[: len(req.prompt_token_ids)] = req.prompt_token_ids
            filled = len(req.prompt_token_ids)
        else:
            grown[:filled] = buf[:filled]
        buf = grown
    if filled < known:
        prompt_len = len(req.prompt_token_ids)
        buf[filled:known] = req.output_token_ids[filled - prompt_len : known - prompt_len]
    req.draft_context = (buf, known)
    return buf[:known]


def ngram_drafts(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` of length n_max >= n >= n_min; [] when no such suffix occurs earlier.

    One pass over the context finds where its last token occurs before; the matches then
    grow backwards one token at a time among those candidates only."""
    size = tokens.shape[0]
    if size <= n_min:
        return []
    ends = np.flatnonzero(tokens[: size - 1] == tokens[size - 1])  # matches of length 1
    found = ends if n_min <= 1 else None
    for m in range(1, min(n_max, size - 1)):  # grow matches of length m to m + 1
        ends = ends[ends >= m]
        ends = ends[tokens[ends - m] == tokens[size - 1 - m]]
        if not ends.size:
            break
        if m + 1 >= n_min:
            found = ends
    if found is None or not found.size:
        return []
    start = int(found[-1]) + 1
    return tokens[start : start + k].tolist()


def accepted(tokens: list, drafts: list[int]) -> list:
    """The tokens one step yields: `tokens` (one per row: a row per draft, then the bonus row)
    up to and including the first whose id differs from its row's draft."""
    for j, draft in enumerate(drafts):
        if tokens[j].token_id != draft:
            return tokens[: j + 1]
    return tokens


def draft_contexts(reqs: list, contexts: list) -> list:
    """One sampling context per row of a step with drafts: a request with k drafts gets k + 1,
    row j seeing drafts [:j] as output (penalties, bad words, min_tokens follow them) and
    checking draft j; others keep their one row."""
    rows = []
    for req, ctx in zip(reqs, contexts):
        drafts = req.spec_token_ids
        if not drafts:
            rows.append(ctx)
            continue
        grammars = [None] * (len(drafts) + 1)
        if ctx.grammar is not None:  # each row masked by the state after its drafts
            grammars = DraftGrammar(ctx.grammar, drafts).rows()
        for j in range(len(drafts) + 1):
            row = object.__new__(type(ctx))  # a shallow copy: ~1 us (copy.copy ~5, replace ~6)
            row.__dict__.update(ctx.__dict__)
            if ctx.has_rules:  # only rules read the output so far
                row.output_token_ids = ctx.output_token_ids + drafts[:j]
            row.draft = drafts[j] if j < len(drafts) else None
            row.grammar = grammars[j]
            rows.append(row)
    return rows


def split_rows(sampled: list, rows: list[int]) -> list:
    """Per request, its sampled row (one) or rows (a list, with drafts): `rows` counts them."""
    out, i = [], 0
    for count in rows:
        out.append(sampled[i] if count == 1 else sampled[i : i + count])
        i += count
    return out


class Speculation:
    """An engine's drafting: proposes before each step, books each checked step, and counts
    drafts as vLLM's metrics do."""

    def __init__(self, config: SpeculativeConfig, vocab_size: int, drafter=None):
        self.config = config
        self.vocab_size = vocab_size  # the LM head's: drafts stay below it
        self.drafter = drafter  # draft_model.DraftModel / eagle.EagleDrafter; None: n-gram
        self.num_drafts = 0  # steps of a sequence that checked drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # accepted drafts by position (vLLM's spec_decode_num_accepted_tokens_per_pos)
        self.accepted_per_pos = [0] * config.num_speculative_tokens

    @classmethod
    def start(cls, config: SpeculativeConfig | None, task: str, vocab_size: int,
              drafter=None) -> Speculation | None:  # fmt: skip
        if config is None:
            return None
        if task != "generate":
            raise InvalidInputError(
                f"speculative_config: a {task} model generates no tokens to speculate on"
            )
        return cls(config, vocab_size, drafter)

    def active(self, scheduler) -> bool:
        """Whether this step drafts: always, unless more requests than `disable_by_batch_size`
        are queued or running."""
        limit = self.config.disable_by_batch_size
        return limit is None or len(scheduler.running) + len(scheduler.waiting) <= limit

    def propose(self, scheduler) -> None:
        """Drafts for each running sequence that decodes next step (its last token known and
        not yet computed; not a prompt given as embeddings, whose ids are placeholders)."""
        ready = [
            req
            for req in scheduler.running
            if not req.spec_token_ids
            and not req.num_pending
            and req.output_token_ids
            and req.num_computed_tokens == req.num_known_tokens - 1
        ]
        if self.drafter is None:
            for req in ready:
                req.spec_token_ids = self.config.propose(req, self.vocab_size)
            return
        ready = [req for req in ready if not req.prompt_embeds]
        rooms = [self.config.room(req) for req in ready]
        self.drafter.max_step_tokens = scheduler.max_num_batched_tokens
        found = self.drafter.propose(scheduler.kv, ready, rooms, self.vocab_size)
        for req, drafts in zip(ready, found):
            req.spec_token_ids = drafts

    def book(self, req, tokens: list) -> list:
        """The tokens `req`'s checked step yields; its computed count goes back past the
        rejected drafts (their KV is overwritten later) and its drafts are cleared."""
        drafts = req.spec_token_ids
        kept = accepted(tokens, drafts)
        rejected = len(drafts) - (len(kept) - 1)
        req.num_computed_tokens -= rejected
        req.spec_token_ids = []
        self.num_drafts += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += len(drafts) - rejected
        for pos in range(len(drafts) - rejected):
            self.accepted_per_pos[pos] += 1
        return kept
