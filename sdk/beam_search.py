"""Beam search with vLLM's API (`LLM.beam_search(prompts, BeamSearchParams)`) and transformers'
algorithm (`generate(num_beams=..., do_sample=False)`: same beams, same scores).

Each step asks the engine for one token per running beam with the top-K logprobs (K =
`max(2, 1 + number of EOS ids) * beam_width`, as transformers keeps); the prefix cache makes
the shared prompt and beam prefixes cheap. Then, per prompt, as transformers does: the K best
(beam, token) continuations by summed logprob; those that end (EOS, or the length limit) and
rank within the first `beam_width` become finished hypotheses scored `sum / len ** penalty`;
the `beam_width` best others run on. The search stops when no running beam can beat the worst
of `beam_width` finished ones (transformers' `early_stopping=False` heuristic) or when every
continuation ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.sampling_params import MAX_LOGPROBS, SamplingParams
from polymodal.processors.types import PROMPT_EMBEDS, ProcessedPrompt

_DEAD = -1.0e9  # transformers' score for beams that cannot be chosen


class BeamSearchParams(BaseModel):
    """vLLM's beam search parameters. `temperature` must be 0: the search is deterministic."""

    model_config = ConfigDict(extra="forbid")

    beam_width: int
    """Beams kept per prompt (and sequences returned)."""
    max_tokens: int
    """Most tokens generated per beam."""
    ignore_eos: bool = False
    """Beams do not end at EOS."""
    temperature: float = 0.0
    """Only 0 (deterministic beam search)."""
    length_penalty: float = 1.0
    """Finished beams score `sum of logprobs / generated_len ** length_penalty`."""
    include_stop_str_in_output: bool = False
    """Keep a final EOS token's text in `text` (it is always in `tokens`)."""

    def __init__(self, **data) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidInputError(f"BeamSearchParams: {errors}") from None

    @field_validator("beam_width")
    @classmethod
    def _check_width(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _check_max_tokens(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        if value != 0.0:
            raise ValueError("must be 0: beam search here is deterministic (transformers')")
        return value


@dataclass
class BeamSearchSequence:
    """One returned beam. `tokens` include the prompt (as in vLLM); `text` decodes them."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per generated token
    cum_logprob: float = 0.0
    score: float = 0.0  # cum_logprob / generated_len ** length_penalty (transformers' score)
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) | "length"
    stop_reason: int | None = None  # the EOS id that ended it


@dataclass
class BeamSearchOutput:
    """The `beam_width` best sequences of one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Beam:
    generated: list[int]
    score: float  # summed logprobs (_DEAD for a beam that cannot continue)
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass
class _Search:
    """The state of one prompt's search."""

    prompt: ProcessedPrompt
    running: list[_Beam]
    finished: list[tuple[float, _Beam, bool]] = field(default_factory=list)  # score, beam, eos
    open: bool = True  # transformers' is_early_stop_heuristic_unsatisfied


class BeamSearch:
    """The search over a batch of prompts, driven step by step: score `requests()` (one token,
    `scoring_params`), hand the logprob tables to `advance`, until `done`; then `outputs`."""

    def __init__(self, prompts: list[ProcessedPrompt], params: BeamSearchParams, eos_ids):
        self.params = params
        self.eos = () if params.ignore_eos else tuple(eos_ids)
        self.keep = max(2, 1 + len(self.eos)) * params.beam_width
        if self.keep > MAX_LOGPROBS:
            raise InvalidInputError(
                f"BeamSearchParams.beam_width={params.beam_width} needs the top {self.keep} "
                f"logprobs per step (this model has {len(self.eos)} EOS ids); at most "
                f"{MAX_LOGPROBS} are available"
            )
        self.scoring_params = SamplingParams(
            max_tokens=1, temperature=0.0, logprobs=self.keep, ignore_eos=True
        )
        if any(item.modality == PROMPT_EMBEDS for p in prompts for item in p.mm_items):
            raise InvalidInputError("beam search takes token prompts, not prompt_embeds")
        self._searches = [_Search(p, [_Beam([], 0.0)]) for p in prompts]
        self._live: list[tuple[_Search, _Beam]] = []
        self._step = 0

    @property
    def done(self) -> bool:
        return not any(s.open for s in self._searches)

    def requests(self) -> list[ProcessedPrompt]:
        """The prompts to score this step: every running beam's prompt + tokens so far."""
        self._live = [
            (s, b) for s in self._searches if s.open for b in s.running if b.score > _DEAD / 2
        ]
        return [extend_prompt(s.prompt, b.generated) for s, b in self._live]

    def advance(self, tables: list[dict[int, float]]) -> None:
        """One step, given the top-`keep` logprob table of each prompt from `requests()`."""
        by_beam = {id(b): table for (_, b), table in zip(self._live, tables, strict=True)}
        for s in self._searches:
            if s.open:
                _advance(s, by_beam, self._step, self.params.beam_width, self.keep, self.eos,
                         self.params)  # fmt: skip
        self._step += 1

    def outputs(self, tokenizer) -> list[BeamSearchOutput]:
        """The finished beams of every prompt, best first."""
        results = []
        for s in self._searches:
            sequences = []
            for score, beam, by_eos in s.finished:
                tokens = s.prompt.token_ids + beam.generated
                keep_eos = self.params.include_stop_str_in_output or not by_eos
                shown = tokens if keep_eos else tokens[:-1]
                text = tokenizer.decode(shown, skip_special_tokens=True) if tokenizer else None
                sequences.append(
                    BeamSearchSequence(
                        tokens=tokens,
                        logprobs=beam.logprobs,
                        cum_logprob=beam.score,
                        score=score,
                        text=text,
                        finish_reason="stop" if by_eos else "length",
                        stop_reason=beam.generated[-1] if by_eos else None,
                    )
                )
            results.append(BeamSearchOutput(sequences))
        return results


def beam_search(
    llm, prompts: list[ProcessedPrompt], params: BeamSearchParams, use_tqdm: bool = False
):
    """Run the search for every prompt, each step batched through `llm`'s engine
    (`use_tqdm`: a progress bar of steps, at most `max_tokens`)."""
    search = BeamSearch(prompts, params, llm.engine.model_config.eos_token_ids)
    bar = None
    if use_tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=params.max_tokens, desc="Beam search", unit="token")
    try:
        while not search.done:
            ids = [llm.submit(p, search.scoring_params) for p in search.requests()]
            search.advance([out.outputs[0].logprobs[0] for out in llm.run(ids)])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return search.outputs(llm.tokenizer)


def _advance(s: _Search, tables: dict, step: int, width: int, keep: int, eos, params) -> None:
    """One transformers beam-search step for one prompt."""
    candidates = []  # (summed logprob, beam index, token)
    for b_index, beam in enumerate(s.running):
        if beam.score <= _DEAD / 2:
            continue
        for token, logprob in tables[id(beam)].items():
            candidates.append((beam.score + logprob, b_index, token))
    # transformers' topk over beam-major flat indices: ties go to the lower beam, then token
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    top = candidates[:keep]
    length = step + 1  # generated tokens after this step
    ends = [tok in eos or length >= params.max_tokens for _, _, tok in top]
    children = []
    for score, b_index, token in top:
        parent = s.running[b_index]
        table = tables[id(parent)]
        children.append(
            _Beam(parent.generated + [token], score, parent.logprobs + [{token: table[token]}])
        )
    # finished hypotheses: only those within the first `width` candidates count
    if s.open:
        for rank, (child, end) in enumerate(zip(children, ends)):
            if end and rank < width:
                normalized = child.score / (length**params.length_penalty)
                s.finished.append((normalized, child, child.generated[-1] in eos))
        s.finished.sort(key=lambda f: -f[0])
        del s.finished[width:]
    running = [(c.score + (_DEAD if end else 0.0), c) for c, end in zip(children, ends)]
    running.sort(key=lambda r: -r[0])
    s.running = [_Beam(c.generated, score, c.logprobs) for score, c in running[:width]]
    # stop when every continuation ended, or no running beam can beat the worst finished one
    if all(ends):
        s.open = False
        return
    best_running = s.running[0].score / (length**params.length_penalty)
    worst_finished = s.finished[-1][0] if len(s.finished) == width else _DEAD
    if not best_running > worst_finished:
        s.open = False


def extend_prompt(prompt: ProcessedPrompt, generated: list[int]) -> ProcessedPrompt:
    """`prompt` followed by `generated` tokens, positioned as decode steps would place them
    (M-RoPE: position `index + mrope_delta` on all three axes)."""
    if not generated:
        return prompt
    positions = prompt.positions
    if positions is not None:
        start = len(prompt.token_ids) + prompt.mrope_delta
        extra = list(range(start, start + len(generated)))
        positions = [row + extra for row in positions]
    return ProcessedPrompt(
        prompt.token_ids + generated, positions, prompt.mrope_delta, prompt.mm_items,
        prompt.cache_salt,
    )  # fmt: skip
