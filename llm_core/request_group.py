"""One user request as the engine holds it (`RequestGroup`): its `n` sequences (seeds
`seed + i`), their detokenizers and live outputs; booking a sampled token on a sequence
(logprobs, text, the stop checks) and the `RequestOutput` snapshot the engine returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from polymodal.llm_core.detokenizer import IncrementalDetokenizer
from polymodal.llm_core.outputs import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    Timings,
    Usage,
)
from polymodal.llm_core.request import Request
from polymodal.llm_core.sampler import make_generator
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.llm_core.structured_output import GrammarState


@dataclass
class RequestGroup:
    """A user request: its `n` sequences and their detokenizers."""

    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Request]
    detoks: list[IncrementalDetokenizer | None]
    outputs: list[CompletionOutput]
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    arrival_wall: float = field(default_factory=time.time)  # RequestMetrics.arrival_time
    first_scheduled: float | None = None  # wall clock, from the scheduler

    @classmethod
    def sample(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Any,
        device: Any,
        grammar: Any,
        mm_items: list,
        **request_fields: Any,
    ) -> RequestGroup:
        """The `n` sequences of a generate request (`<id>#i`, seeded `seed + i`; prompt
        logprobs on the first), each with its own list of `mm_items`, its grammar state and
        detokenizer (none without a tokenizer: token ids only). `request_fields` go to every
        `Request`."""
        seqs, detoks = [], []
        for i in range(params.n):
            seq = Request(
                request_id=f"{request_id}#{i}",
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                mm_items=list(mm_items),
                **request_fields,
            )
            if params.seed is not None:
                seq.generator = make_generator(params.seed + i, device)
            if grammar is not None:
                seq.grammar = GrammarState(grammar)
            if params.prompt_logprobs is not None and i == 0:
                seq.prompt_logprobs = [None] * len(prompt_token_ids)
            seqs.append(seq)
            detoks.append(
                IncrementalDetokenizer(
                    tokenizer, [] if seq.prompt_embeds else seq.prompt_token_ids, params
                )
                if tokenizer is not None and params.detokenize
                else None  # skip_tokenizer_init or detokenize=False: token ids only
            )
        outputs = [CompletionOutput(index=i) for i in range(params.n)]
        return cls(request_id, list(prompt_token_ids), seqs, detoks, outputs)

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def append(self, i: int, tok: Any, now: float, max_model_len: int) -> str | None:
        """Book sequence `i`'s sampled token (`tok`: the sampler's token, logprob and top-N):
        logprobs, text, stop checks. Returns the finish reason when it ended the sequence
        (the caller frees it), else None."""
        seq, out, detok = self.seqs[i], self.outputs[i], self.detoks[i]
        seq.output_token_ids.append(tok.token_id)
        self.first_token = self.first_token or now
        out.delta_token_ids = [tok.token_id]
        if seq.params.logprobs is not None:
            # the top-N table, plus the chosen token's own logprob when it is not in the top-N
            table = {**(tok.top_logprobs or {}), tok.token_id: tok.logprob}
            out.logprobs = (out.logprobs or []) + [table]
            seq.cumulative_logprob += tok.logprob
            out.cumulative_logprob = seq.cumulative_logprob
        out.delta_text = detok.step(tok.token_id) if detok else ""
        reason = stop = None
        grammar_done = False
        if seq.grammar is not None:
            # a token the grammar refuses cannot be sampled (masked); end the output if so
            grammar_done = not seq.grammar.accept(tok.token_id) or seq.grammar.is_terminated
        if detok and detok.finished:
            reason, stop = "stop", detok.stop_reason
        elif tok.token_id in seq.eos_token_ids or tok.token_id in seq.params.stop_token_ids:
            reason, stop = "stop", tok.token_id
        elif grammar_done:
            reason = "stop"
        elif len(seq.output_token_ids) >= (seq.params.max_tokens or 1 << 62):
            reason = "length"
        elif seq.num_tokens >= max_model_len:
            reason = "length"
        if reason is not None:
            out.delta_text += detok.flush() if detok and not detok.finished else ""
            out.finish_reason, out.stop_reason = reason, stop
            seq.finish_reason, seq.stop_reason = reason, stop
        out.text = detok.text if detok else ""
        out.token_ids = seq.output_token_ids  # live list; `_snapshot` copies it out
        return reason

    def append_all(self, i: int, toks: list, now: float, max_model_len: int) -> str | None:
        """`append` of several tokens one step yielded (accepted drafts and the token after
        them) until one ends the sequence; the output's deltas hold all that were booked."""
        out, text, ids = self.outputs[i], "", []
        reason = None
        for tok in toks:
            reason = self.append(i, tok, now, max_model_len)
            text += out.delta_text
            ids += out.delta_token_ids
            if reason is not None:
                break
        out.delta_text, out.delta_token_ids = text, ids
        return reason

    def output(self, now: float) -> RequestOutput:
        """The request's state now, for the caller to keep (deltas are reset here)."""
        finished = self.finished
        if self.first_scheduled is None:
            scheduled = [s.first_scheduled_time for s in self.seqs if s.first_scheduled_time]
            self.first_scheduled = min(scheduled, default=None)
        # wall-clock metrics from the monotonic times; every group here got a token just now
        wall_now = self.arrival_wall + (now - self.arrival)
        first = self.first_token
        metrics = RequestMetrics(
            self.arrival_wall,
            self.first_scheduled,
            None if first is None else self.arrival_wall + (first - self.arrival),
            wall_now,
            wall_now if finished else None,
        )
        return RequestOutput(
            request_id=self.request_id,
            # a prompt given as embeddings has no token ids (vLLM's None)
            prompt_token_ids=None if self.seqs[0].prompt_embeds else self.prompt_token_ids,
            outputs=[_snapshot(o) for o in self.outputs],
            finished=finished,
            usage=Usage(len(self.prompt_token_ids), sum(len(o.token_ids) for o in self.outputs)),
            timings=Timings(
                time_to_first_token=first - self.arrival if first else None,
                total=now - self.arrival if finished else None,
            ),
            prompt_logprobs=self.seqs[0].prompt_logprobs,
            metrics=metrics,
            num_cached_tokens=self.seqs[0].num_cached_tokens,
        )


def _snapshot(out: CompletionOutput) -> CompletionOutput:
    """A copy the caller may keep while the engine goes on mutating the live one."""
    snap = CompletionOutput(
        out.index,
        out.text,
        out.token_ids[:],
        out.finish_reason,
        out.stop_reason,
        out.logprobs,
        out.delta_text,
        out.delta_token_ids,
        out.cumulative_logprob,
    )
    out.delta_text, out.delta_token_ids = "", []
    return snap
