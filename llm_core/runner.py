"""Runs one step: encoders, the flat batch (`step_batch.py`), the decoder (eager, or a captured
graph: `cuda_graph.py`), prompt logprobs, the LM head and the sampler; `resolve` reads the
sampled ids back.

The batch is flat: every scheduled token of every request, concatenated. Encoder outputs
are cached by content hash and sliced by slot range (`media_inputs.py`; only the span
positions an item's `embed_mask` marks take a row), so a chunked prefill can split one
image's slots across steps and a repeated image runs its encoder once. A model whose images
attend bidirectionally (`bidirectional_media`) gets each step's embedded runs as per-token
key ranges in the attention metadata (`media_key_ranges`); the scheduler keeps those spans
inside one step.

Cross-attention models (cross KV groups, after the token groups) get one more metadata per
cross group: each sequence's encoder-row table and count, each token's rows `[lo, hi)` and gate
(`Request.cross_ranges`), and, for requests whose cross tables were just allocated, their
encoder states (`SupportsMultiModal.cross_states`, encoder outputs cached by content hash) with
the cross slots their K/V go to: written once, in the request's first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from polymodal.llm_core.aux_states import outputs_aux
from polymodal.llm_core.cross_inputs import cross_states
from polymodal.llm_core.encoder_cache import EncoderCache
from polymodal.llm_core.host_copy import to_device, upload
from polymodal.llm_core.layers.embedding import merge_multimodal_embeddings
from polymodal.llm_core.media_inputs import (
    encoder_outputs,
    media_key_ranges,
    slot_embeddings,
    step_has_media,
)
from polymodal.llm_core.request import Request
from polymodal.llm_core.sampler import SampledToken, Sampler, SamplingContext
from polymodal.llm_core.scheduler import SchedulerOutput
from polymodal.llm_core.speculative import draft_contexts, split_rows
from polymodal.llm_core.step_batch import HostBatch, device_batch, host_batch

PROMPT_LOGPROB_CHUNK = 512  # prompt rows per LM-head call when computing prompt logprobs


class ModelRunner:
    """Owns the model, the KV tensors, the encoder cache and the sampler."""

    def __init__(
        self,
        model,
        kv_caches: list,
        block_size: int,
        device,
        num_kv_groups: int = 1,
        encoder_cache_bytes: int = 256 << 20,
        num_cross_groups: int = 0,
        max_encoder_rows: int = 0,
    ):
        self.model = model
        # per layer [2, num_blocks, block_size, kv_heads, head_dim] (a tensor several groups'
        # layers share), or None for a layer without a KV cache
        self.kv_caches = kv_caches
        self.block_size = block_size
        # block tables per request (a model without KV layers still gets one, empty and unread):
        # token groups first, then cross groups (encoder rows, at most `max_encoder_rows`)
        self.num_kv_groups = max(1, num_kv_groups)
        self.num_cross_groups = num_cross_groups
        self.max_cross_blocks = -(-max_encoder_rows // block_size)
        self.device = torch.device(device)
        self.uses_mrope = model.config.mrope_section is not None
        self.bidirectional_media = getattr(model, "bidirectional_media", False)
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.sampler = Sampler()
        self.graphs = None  # DecodeGraphs once capture_decode_graphs() ran
        # LoRAManager when adapters are on: it fills each step's token -> adapter-slot mapping
        self.lora = None
        self.prefill_graphs = None  # PrefillGraphs once capture_prefill_graphs() ran
        self.warm_up_seconds = 0.0  # load_warmup.warm_up_long_paths's time at load (CUDA)
        # tensor_parallel_size > 1: the TPExecutor that hands each step to the other ranks
        # (this runner is rank 0's: it alone samples); None runs as one process
        self.executor = None
        # speculative decoding with a draft model or an EAGLE head (draft_model.DraftModel,
        # eagle.EagleDrafter: handed each step's hidden states), else None
        self.draft = None
        self.kv_tier = None  # kv_offload.HostKVTier: its queued copies run before each step

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """Capture CUDA graphs for decode batches up to `max_batch` (needs a graph-safe backend)."""
        from polymodal.llm_core.cuda_graph import DecodeGraphs

        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(
            self.model, self.kv_caches, max_batch, max_blocks, self.uses_mrope, self.num_kv_groups,
            self.num_cross_groups, self.max_cross_blocks,
        )  # fmt: skip
        self._capture(self.graphs)

    def capture_prefill_graphs(self, max_tokens: int, max_model_len: int, verify_width: int = 0,
                               max_seqs: int = 0) -> None:  # fmt: skip
        """Capture CUDA graphs for non-decode steps of up to `max_tokens` tokens (and verify
        steps of `verify_width` tokens a sequence, up to `max_seqs` sequences)."""
        from polymodal.llm_core.prefill_graphs import PrefillGraphs

        max_blocks = -(-max_model_len // self.block_size)
        self.prefill_graphs = PrefillGraphs(
            self.model, self.kv_caches, max_tokens, max_blocks, self.uses_mrope, self.num_kv_groups,
            self.num_cross_groups, self.max_cross_blocks, self.bidirectional_media, verify_width,
            max_seqs,
        )  # fmt: skip
        self._capture(self.prefill_graphs)

    def _capture(self, graphs) -> None:
        """Capture `graphs` as the plain set; with LoRA also as the LoRA set, whose graphs record
        the LoRA kernels whatever the step holds (no adapter token while capturing: they do
        nothing then) and whose replays read each step's mapping. `lora_step` picks the set."""
        if self.lora is None:
            graphs.capture(False)
            return
        batch = self.lora.batch
        for lora in (True, False):
            batch.clear()
            batch.always_run = lora
            graphs.capture(lora)
        batch.always_run = False

    def lora_step(self) -> bool:
        """Whether a token of the step just set (`LoRAManager.set_step`) uses an adapter: it
        runs the LoRA kernels (the LoRA graph set); others run exactly as without LoRA."""
        return self.lora is not None and self.lora.batch.num_active > 0

    # ---- inputs (step_batch.py) ----------------------------------------------------------
    def host_batch(self, sched: SchedulerOutput, prev: InFlight | None = None) -> HostBatch:
        """This step's flat batch as host lists; decode ids `prev` sampled stay on the device."""
        prev_rows = prev.row_of() if prev is not None and prev.tokens is not None else {}
        return host_batch(
            sched, prev_rows, self.block_size, self.num_kv_groups, self.num_cross_groups,
            self.uses_mrope,
        )  # fmt: skip

    def prepare(self, sched: SchedulerOutput | None, hb: HostBatch | None = None):
        """The step's input ids, positions and attention metadata on the device (from `hb`,
        else built from `sched`)."""
        return device_batch(hb or self.host_batch(sched), self.uses_mrope, self.device)

    # ---- step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(
        self,
        sched: SchedulerOutput,
        prev: InFlight | None = None,
        overlap: bool = False,
        defer: bool = False,
    ) -> InFlight:
        """Queue one step's device work; nothing is read back (see `resolve`).

        Tokens sampled by `prev` that are still in flight feed this step's input ids on the
        device, so the host never waits for them before launching. `overlap` (async
        scheduling) copies the sampled ids to pinned memory behind an event, so reading them
        back later waits for this step only, not for whatever is queued after it.
        `defer`: the forward pass (logits included) is queued but not the sampling: a batch
        whose rules follow the previous tokens (grammars, penalties, bad words) samples in
        `finish_sampling`, once `prev` is resolved, while the GPU runs this forward pass.
        """
        if self.kv_tier is not None:  # blocks saved to / loaded from host memory, first
            self.kv_tier.run_pending()
        has_media = step_has_media(sched)
        # The encoder goes first: the device starts on it while the host builds the batch.
        slot_idx, mm = (
            slot_embeddings(sched, self.model, self.encoder_cache, self.device)
            if has_media
            else (None, None)
        )
        writes = [r for r in sched.requests if r.cross_pending] if self.num_cross_groups else []
        encode = partial(encoder_outputs, self.model, self.encoder_cache)
        states = cross_states(self.model, writes, encode) if writes else None
        hb = self.host_batch(sched, prev)
        if self.lora is not None:  # static buffers the LoRA layers (and their graphs) read
            self.lora.set_step(sched.requests, sched.num_new_tokens)
        if has_media and self.bidirectional_media:
            hb.key_ranges = media_key_ranges(sched)
        graphs = self.graphs
        if (
            graphs
            and hb.is_decode
            and not has_media
            and not writes
            and not hb.prompt_logprob_spans
            and graphs.can_run(len(hb.ids), hb.max_blocks)
        ):
            return self._launch_graph(sched, hb, prev, overlap, self.lora_step(), defer)
        input_ids, positions, meta = self.prepare(sched, hb)
        if states is not None:  # every cross group stores the same rows' K/V
            for g in range(self.num_kv_groups, self.num_kv_groups + self.num_cross_groups):
                meta.group(g).cross_states = states
        if self.executor is not None:  # the other ranks run this step with us, in lock step
            self.executor.run_step(hb, slot_idx, mm)
        if hb.pending_rows:  # ids sampled by `prev`, never read back to the host
            rows, src = upload([hb.pending_rows, hb.pending_src], torch.int64, self.device)
            input_ids[rows] = prev.tokens[src]
        embeds = self.model.embed(input_ids)
        if slot_idx is not None:
            embeds = merge_multimodal_embeddings(embeds, slot_idx, mm)
        prefill = self.prefill_graphs
        fits = prefill and prefill.can_run(
            len(hb.ids), len(hb.query_lens), hb.max_blocks, hb.key_ranges, meta.max_query_len
        )
        # captured graphs store no encoder rows: the model may store them first (Mllama)
        if (
            fits
            and states is not None
            and self.model.store_cross_states(states, self.kv_caches, meta)
        ):
            states = None
        if fits and states is None:
            hidden = prefill.run(embeds, positions, meta, self.lora_step())
            aux = prefill.last_aux
        else:
            hidden = self.model(positions, embeds, self.kv_caches, meta)
            aux = outputs_aux(self.model)
        if self.draft is not None and self.draft.records:  # an EAGLE head's features
            self.draft.record(sched, hidden, aux)
        if hb.prompt_logprob_spans:
            self._prompt_logprobs(hidden, hb.prompt_logprob_spans)
        return self.sample(sched, hidden, hb.sample_rows, overlap, defer)

    def _prompt_logprobs(self, hidden: torch.Tensor, spans: list) -> None:
        """Logprob (+ top-N) of each prompt token given the ones before it, written into
        `req.prompt_logprobs[position]`; read back at once (such requests run synchronously).
        Rows go through the LM head in chunks, so a long prompt never holds [len, vocab]."""
        rows, targets, where = [], [], []
        for req, offset, start, end in spans:
            for pos in range(start, end):  # hidden at `pos` predicts the token at pos + 1
                rows.append(offset + pos - start)
                targets.append(req.prompt_token_ids[pos + 1])
                where.append((req, pos + 1))
        top_n = max(req.params.prompt_logprobs for req, *_ in spans)
        for lo in range(0, len(rows), PROMPT_LOGPROB_CHUNK):
            hi = lo + PROMPT_LOGPROB_CHUNK
            index, target = upload([rows[lo:hi], targets[lo:hi]], torch.int64, hidden.device)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[index]).float(), -1)
            chosen = logprobs.gather(1, target.unsqueeze(1)).squeeze(1).tolist()
            top_values, top_ids = (t.tolist() for t in logprobs.topk(top_n, dim=-1))
            for k, (req, pos) in enumerate(where[lo:hi]):
                n = req.params.prompt_logprobs
                table = dict(zip(top_ids[k][:n], top_values[k][:n]))
                table[req.prompt_token_ids[pos]] = chosen[k]
                req.prompt_logprobs[pos] = table

    def _launch_graph(self, sched, hb: HostBatch, prev: InFlight | None, overlap: bool,
                      lora: bool, defer: bool = False):  # fmt: skip
        """A decode step as one graph replay (of the LoRA set when `lora`): LM head and greedy
        argmax included."""
        logits, greedy = self.graphs.run(hb, prev.tokens if hb.pending_rows else None, lora)
        if self.draft is not None and self.draft.records:
            self.draft.record(sched, self.graphs.last_hidden, self.graphs.last_aux)
        reqs = _sampling_requests(sched)
        if not hb.sample_rows:
            return InFlight(reqs)
        if len(hb.sample_rows) != len(hb.ids):  # a prompt chunk of one token samples nothing
            rows = to_device(hb.sample_rows, torch.int64, logits.device)
            logits, greedy = logits[rows], greedy[rows]
        if defer:
            return InFlight(reqs, deferred=(logits, greedy, overlap))
        return self.sample_logits(reqs, logits, greedy, overlap)

    def sample(self, sched, hidden, sample_rows, overlap: bool = False,
               defer: bool = False) -> InFlight:  # fmt: skip
        """Logits of the sampled rows of `hidden`, then `sample_logits` (later with `defer`)."""
        reqs = _sampling_requests(sched)
        if not sample_rows:
            return InFlight(reqs)
        if len(sample_rows) != hidden.shape[0]:  # else every row samples (decode): no gather
            hidden = hidden[to_device(sample_rows, torch.int64, hidden.device)]
        logits = self.model.compute_logits(hidden)
        if defer:
            return InFlight(reqs, deferred=(logits, None, overlap))
        return self.sample_logits(reqs, logits, None, overlap)

    def finish_sampling(self, flight: InFlight) -> InFlight:
        """Sample a step launched with `defer`, now that the step before it is resolved: its
        requests' output ids, grammars and counts are current on the host. The token being
        sampled is already counted in `num_pending` (the scheduler's update), so it is left
        out; a request that finished meanwhile samples without rules (its token is dropped)."""
        if flight.deferred is None:
            return flight
        logits, greedy, overlap = flight.deferred
        return self.sample_logits(flight.reqs, logits, greedy, overlap, pending_offset=1)

    def sample_logits(self, reqs, logits, greedy=None, overlap: bool = False,
                      pending_offset: int = 0) -> InFlight:  # fmt: skip
        """Sample one token per row of `logits` (fp32, one row per request of `reqs`) on the
        device; the ids are copied to the host asynchronously. `greedy` (the rows' argmax,
        computed in a decode graph) is the answer as is when every row is plain greedy."""
        contexts = [
            SamplingContext(
                r.params,
                [] if r.prompt_embeds else r.prompt_token_ids,  # placeholders: no tokens
                r.output_token_ids,
                r.generator,
                r.stop_ids,
                r.bad_words_ids,
                None if r.is_finished else r.grammar,
                r.num_pending - pending_offset,
                r.has_logit_rules and not r.is_finished,
            )
            for r in reqs
        ]
        drafting = any(r.spec_token_ids for r in reqs)
        if drafting:  # a row per draft, then the bonus row (speculative.py)
            contexts = draft_contexts(reqs, contexts)
        if greedy is not None and all(r.plain_argmax for r in reqs):
            tokens, raw_logprobs = greedy, None
            if not (overlap and tokens.is_cuda):  # read after the next step rewrote the buffer
                tokens = tokens.clone()
        else:
            tokens, raw_logprobs = self.sampler.sample(logits, contexts)
        flight = InFlight(reqs, contexts, tokens, raw_logprobs)
        if drafting:
            flight.rows = [1 + len(r.spec_token_ids) for r in reqs]
        if overlap and tokens.is_cuda and raw_logprobs is None:
            flight.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            flight.host.copy_(tokens, non_blocking=True)
            flight.event = torch.cuda.Event()
            flight.event.record()
        return flight

    def resolve(self, flight: InFlight) -> dict[str, SampledToken]:
        """Wait for a launched step's tokens (only for them: later work stays queued)."""
        if flight.tokens is None:
            return {}
        if flight.event is not None:
            flight.event.synchronize()
            sampled = [SampledToken(t) for t in flight.host.tolist()]
        else:
            sampled = self.sampler.package(flight.tokens, flight.raw_logprobs, flight.contexts)
        if flight.rows is not None:  # drafts: each request's rows as a list
            sampled = split_rows(sampled, flight.rows)
        return {r.request_id: tok for r, tok in zip(flight.reqs, sampled)}


@dataclass
class InFlight:
    """A launched step: which requests sample, and where their ids will appear."""

    reqs: list[Request]
    contexts: list = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [len(reqs)] on the device
    raw_logprobs: torch.Tensor | None = None
    host: torch.Tensor | None = None  # pinned copy of `tokens`, valid once `event` completes
    event: torch.cuda.Event | None = None
    deferred: tuple | None = None  # (logits, greedy, overlap) until `finish_sampling`
    rows: list[int] | None = None  # sampled rows per request when some verify drafts

    def row_of(self) -> dict[str, int]:
        """request id -> row in `tokens`."""
        return {r.request_id: i for i, r in enumerate(self.reqs)}


def _sampling_requests(sched: SchedulerOutput) -> list[Request]:
    """The requests whose scheduled tokens reach their end: each samples one token."""
    return [
        req
        for req, n in zip(sched.requests, sched.num_new_tokens)
        if req.num_computed_tokens + n == req.num_tokens
    ]
