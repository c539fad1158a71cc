"""Turn one logits row per sequence into one token: penalties, temperature, min-p, top-k/p.

Order follows vLLM's v1 sampler: raw logprobs -> per-request rules (grammar, allowed ids, bad
words, min_tokens, logit bias; `logit_rules`) -> penalties (repetition, frequency, presence)
-> processed logprobs (rows that ask for them) -> greedy argmax for greedy rows -> temperature
-> min-p -> top-k -> top-p -> sample.

Sampling uses the exponential race: with q ~ Exp(1) i.i.d. per token, argmax(probs / q) is
distributed as probs. A seeded row draws its q from its own generator, a fixed number of
values (vocab) per step, so its tokens never depend on batch size, row position or other rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from polymodal.llm_core.host_copy import to_device
from polymodal.llm_core.logit_rules import apply_logit_rules
from polymodal.llm_core.sampling_params import SamplingParams

# Floor for the exponential noise: an exact 0 would turn a masked 0/0 into NaN.
_MIN_NOISE = 1e-20


@dataclass
class SamplingContext:
    """Everything the sampler needs about one logits row (one sequence)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    """This request's own random stream (on the logits' device) when `params.seed` is set."""
    stop_token_ids: tuple[int, ...] = ()
    """EOS ids (unless ignore_eos) and `params.stop_token_ids`: masked before `min_tokens`."""
    bad_words_ids: list[list[int]] = field(default_factory=list)
    """`params.bad_words` as token sequences: the last token is banned after the others."""
    grammar: Any = None
    """Structured output state (`logit_rules.TokenGrammar`) when the request has one."""
    num_pending: int = 0
    """Tokens already sampled but not yet in `output_token_ids` (async scheduling)."""
    has_rules: bool | None = None
    """`params.has_logit_rules`, read once per request by the engine (None: read it here)."""
    draft: int | None = None
    """A speculative draft this row checks: a sampled row keeps it with its probability,
    else samples from the rest of the distribution (a greedy row is its argmax either way)."""

    def __post_init__(self) -> None:
        if self.has_rules is None:
            self.has_rules = self.params.has_logit_rules


@dataclass
class SampledToken:
    """The token picked for one row, with logprobs of the model's raw distribution."""

    token_id: int
    logprob: float | None = None
    """log_softmax(raw logits)[token_id], when `params.logprobs` is not None."""
    top_logprobs: dict[int, float] | None = None
    """The `params.logprobs` most likely tokens -> logprob, most likely first."""


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (any int; wrapped into 64 bits)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (1 << 64))
    return generator


def apply_penalties(logits: torch.Tensor, contexts: list[SamplingContext]) -> torch.Tensor:
    """Repetition (prompt+output), frequency and presence (output) penalties; returns a new tensor.

    logits: [n, vocab] float32. Token counts are built with one scatter per kind.
    """
    n, vocab = logits.shape
    device = logits.device
    rep = [c.params.repetition_penalty for c in contexts]
    freq = [c.params.frequency_penalty for c in contexts]
    pres = [c.params.presence_penalty for c in contexts]
    use_rep = any(r != 1.0 for r in rep)
    if not use_rep and not any(freq) and not any(pres):
        return logits

    # [n, vocab] counts of each token in the output.
    out_counts = _token_counts([c.output_token_ids for c in contexts], n, vocab, device)
    out_seen = out_counts > 0
    logits = logits.clone()
    if use_rep:
        # Prompt ids only matter for rows that use a repetition penalty.
        prompts = [
            c.prompt_token_ids if r != 1.0 else [] for c, r in zip(contexts, rep, strict=True)
        ]
        seen = out_seen | (_token_counts(prompts, n, vocab, device) > 0)
        rep_t = to_device(rep, logits.dtype, device).unsqueeze(1)  # [n, 1]
        penalty = torch.where(seen, rep_t, torch.ones_like(logits))
        # HF-style: shrink positive logits, push negative ones further down.
        logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    freq_t = to_device(freq, logits.dtype, device).unsqueeze(1)
    pres_t = to_device(pres, logits.dtype, device).unsqueeze(1)
    return logits - freq_t * out_counts - pres_t * out_seen.to(logits.dtype)


def _token_counts(
    token_lists: list[list[int]], n: int, vocab: int, device: torch.device
) -> torch.Tensor:
    """[n, vocab] float counts of each id per row, via one index_add over flat ids."""
    lengths = [len(ids) for ids in token_lists]
    counts = torch.zeros(n * vocab, dtype=torch.float32, device=device)
    if sum(lengths) == 0:
        return counts.view(n, vocab)
    # Built on the host from one flat list (nested lists are slow to convert), one copy over.
    flat = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(n), torch.tensor(lengths))
    index = (rows * vocab + flat).to(device)  # [total_tokens] into the flat [n * vocab]
    counts.index_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts.view(n, vocab)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (-inf) tokens with prob < min_p * max prob. logits [n, vocab], min_p [n]."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [n, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p (on the top-k-renormalized distribution) with one descending sort.

    logits [n, vocab]; top_k [n] int (vocab = off); top_p [n] float (1.0 = off). Top-k keeps
    ties with the k-th logit; top-p keeps a token while the mass before it is < top_p, so
    the most likely token always survives.
    """
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, vocab] each
    k_index = (top_k.clamp(1, vocab) - 1).unsqueeze(1)  # [n, 1]
    kth = sorted_logits.gather(1, k_index)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive prefix sum
    drop = mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    """Samples one token per logits row; see the module docstring for the order of steps."""

    def __call__(self, logits: torch.Tensor, contexts: list[SamplingContext]) -> list[SampledToken]:
        """logits: [n, vocab] float32 (CPU or CUDA), one context per row -> n sampled tokens."""
        return self.package(*self.sample(logits, contexts), contexts)

    def sample(
        self, logits: torch.Tensor, contexts: list[SamplingContext]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device half: sampled ids `[n]` and logprobs (if any row wants them; raw, or
        processed for `logprobs_mode="processed_logprobs"` rows), with
        no device-to-host read, so the caller can queue more work before reading them."""
        if logits.dim() != 2 or logits.shape[0] != len(contexts):
            raise ValueError(
                f"logits must be [len(contexts)={len(contexts)}, vocab], got {list(logits.shape)}"
            )
        logits = logits.float()
        want_logprobs = [c.params.logprobs is not None for c in contexts]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

        if any(c.has_rules for c in contexts):
            logits = apply_logit_rules(logits.clone(), contexts)
        logits = apply_penalties(logits, contexts)
        processed = [i for i, c in enumerate(contexts) if c.params.logprobs is not None
                     and c.params.logprobs_mode == "processed_logprobs"]  # fmt: skip
        if processed:  # these rows read their logprobs after the rules and penalties
            rows = to_device(processed, torch.int64, logits.device)
            raw_logprobs[rows] = torch.log_softmax(logits[rows], dim=-1)
        tokens = logits.argmax(dim=-1)  # [n]; final for greedy rows
        random_rows = [i for i, c in enumerate(contexts) if not c.params.is_greedy]
        if random_rows:
            picked = self._sample_random(logits, contexts, random_rows)
            tokens[to_device(random_rows, torch.int64, logits.device)] = picked
        return tokens, raw_logprobs

    def _sample_random(
        self, logits: torch.Tensor, contexts: list[SamplingContext], rows: list[int]
    ) -> torch.Tensor:
        """Temperature, min-p, top-k/top-p and the exponential race for `rows` -> [len(rows)]."""
        device = logits.device
        params = [contexts[i].params for i in rows]
        x = logits[to_device(rows, torch.int64, device)]  # [r, vocab] (a copy)
        temps = to_device([p.temperature for p in params], torch.float32, device)
        x = x / temps.unsqueeze(1)
        if any(p.min_p > 0 for p in params):
            x = apply_min_p(x, to_device([p.min_p for p in params], torch.float32, device))
        vocab = x.shape[1]
        ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        ps = [p.top_p for p in params]
        if any(k < vocab for k in ks) or any(p < 1.0 for p in ps):
            ks_t = to_device(ks, torch.int64, device)
            ps_t = to_device(ps, torch.float32, device)
            if all(k < vocab for k in ks):
                # Every row has a top-k: sort only the top max(k) candidates, not the vocab
                # (ties with the k-th logit beyond max(k) are dropped here).
                top_logits, top_ids = x.topk(max(ks), dim=-1)  # [r, max_k], descending
                kept = apply_top_k_top_p(top_logits, ks_t, ps_t)
                x = torch.full_like(x, float("-inf")).scatter_(1, top_ids, kept)
            else:
                x = apply_top_k_top_p(x, ks_t, ps_t)
        probs = torch.softmax(x, dim=-1)

        # Exponential noise: unseeded rows in one draw from the global stream, seeded rows
        # each from their own generator, always exactly `vocab` values per step.
        noise = torch.empty_like(probs)
        seeded = [j for j, i in enumerate(rows) if contexts[i].generator is not None]
        unseeded = [j for j, i in enumerate(rows) if contexts[i].generator is None]
        if unseeded:
            noise[to_device(unseeded, torch.int64, device)] = torch.empty(
                len(unseeded), vocab, device=device
            ).exponential_()
        for j in seeded:
            noise[j].exponential_(generator=contexts[rows[j]].generator)
        checks = [j for j, i in enumerate(rows) if contexts[i].draft is not None]
        if not checks:
            return (probs / noise.clamp_(min=_MIN_NOISE)).argmax(dim=-1)
        # rows checking a draft d: keep d with probability p(d), else sample from p without d
        # (speculative sampling with a one-token draft: the output is distributed as p)
        at = to_device(checks, torch.int64, device)
        drafts = to_device([contexts[rows[j]].draft for j in checks], torch.int64, device)
        keep = probs[at, drafts]
        uniform = torch.empty(len(checks), device=device).uniform_()
        for n, j in enumerate(checks):
            generator = contexts[rows[j]].generator
            if generator is not None:
                uniform[n] = torch.rand((), device=device, generator=generator)
        probs[at, drafts] = 0.0
        picked = (probs / noise.clamp_(min=_MIN_NOISE)).argmax(dim=-1)
        picked[at] = torch.where(uniform < keep, drafts, picked[at])
        return picked

    @staticmethod
    def package(
        tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, contexts: list[SamplingContext]
    ) -> list[SampledToken]:
        """Move results to the host in a few transfers and build one SampledToken per row."""
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return [SampledToken(token_id=t) for t in token_list]
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
        max_top = max(c.params.logprobs or 0 for c in contexts)
        top_values, top_ids = raw_logprobs.topk(max_top, dim=-1)  # [n, max_top], descending
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        out = []
        for i, ctx in enumerate(contexts):
            num = ctx.params.logprobs
            if num is None:
                out.append(SampledToken(token_id=token_list[i]))
                continue
            top = dict(zip(top_ids[i][:num], top_values[i][:num], strict=True))
            out.append(SampledToken(token_list[i], chosen[i], top))
        return out
