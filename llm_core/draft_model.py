"""Speculative decoding with a draft model (vLLM's `{"method": "draft_model", "model": DIR,
"num_speculative_tokens": k}`): a smaller model with the target's tokenizer proposes each
decoding sequence's next k tokens greedily; the target checks them in one step
(speculative.py). A greedy proposal is a one-point distribution, so the sampler's check keeps
the target's distribution for sampled rows as it does for n-gram drafts.

The draft has its own KV tensors but no block tables: it writes at the block ids of the
sequence's table in the target's pool (vLLM's layout), in tensors of the same block count, so
the memory budget counts both models' pages per block (`block_bytes`). Before a drafting step
each sequence's slots for that step (its last token and k drafts) are allocated in its table;
then the draft runs one forward over the tokens its cache lacks (the whole context at first,
afterwards those accepted since: at most a step's token budget, the rest next step), then
k - 1 one-token forwards, every sequence in one batch. Its cache is valid as far as the
tokens it was fed agree with the sequence's context; a sequence whose blocks changed
(preemption) starts over. Blocks a prefix hit shares were written by the draft of the
request that computed them, or are written again with the same values (same tokens, same
positions), so the draft always computes its own whole context.

The drafts stay on the device from one draft step to the next (read back once, after the
last); the one-token steps replay the draft's own decode graphs on CUDA (`DecodeGraphs`, up to
`MAX_GRAPH_BATCH` sequences), the catch-up runs eagerly. The target needs one KV group of full
attention (or MLA), the draft one of full attention (no sliding windows, chunked or cross
layers); the draft runs without LoRA. The batches, read-back and trim here serve the EAGLE /
MTP heads too (eagle.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.llm_core.config import load_config
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.interfaces import supports_multimodal
from polymodal.llm_core.kv_cache_spec import FULL, MLA, KVCacheLayout, plan_layout
from polymodal.llm_core.step_batch import HostBatch, device_batch

# the draft's one-token steps replay CUDA graphs up to this many sequences (above: eager);
# drafting pays at small batches, and each bucket holds [batch, vocab] fp32 logits
MAX_GRAPH_BATCH = 128


@dataclass
class DraftState:
    """What a sequence's draft cache holds: valid keys below `valid`, and `fed` (the drafts
    it ran last time) at positions from `valid`, still to be checked against the context."""

    table: list[int]  # the target block table it wrote through (a new one: start over)
    valid: int = 0
    fed: tuple[int, ...] = ()

    def computed(self, req) -> int:
        """Positions of `req`'s context whose draft keys are valid now."""
        n, known = self.valid, req.num_known_tokens
        for token in self.fed:
            if n >= known or req.token_id(n) != token:
                break
            n += 1
        return min(n, known)


class DraftModel:
    """The draft model, its KV tensors and its proposals."""

    records = False  # whether the runner hands it each step's outputs (EAGLE heads do)

    def __init__(self, net, layout: KVCacheLayout, block_size: int, device, config):
        self.net = net
        self.kv_caches: list = []  # `attach_kv`, once the pool's block count is known
        self.layout = layout
        self.block_size = block_size
        self.device = torch.device(device)
        self.config = config  # its ModelConfig
        self.vocab_size = config.vocab_size  # ids it can embed
        self.max_step_tokens = 1 << 30  # catch-up tokens one drafting step runs (the budget)

    @property
    def block_bytes(self) -> int:
        """Bytes of the draft's pages at one block id."""
        return self.layout.block_elements(self.block_size) * self.config.dtype.itemsize

    def attach_kv(self, num_blocks: int, max_len: int, graph_batch: int) -> DraftModel:
        """Allocate the draft's KV tensors (`num_blocks` pages, as the target's pool holds) and
        its decode graphs' buffers (steps of up to `graph_batch` sequences; captured by
        `capture`, else run padded and eagerly, as on the CPU)."""
        from polymodal.llm_core.kv_memory import allocate_kv_caches

        self.kv_caches = allocate_kv_caches(
            self.layout, num_blocks, self.block_size, self.config.dtype, self.device
        )
        self.max_blocks = -(-max_len // self.block_size)
        self.graph_batch = min(graph_batch, MAX_GRAPH_BATCH)
        self.reset_graphs()
        return self

    def reset_graphs(self) -> None:
        """Uncaptured decode graphs (sleep drops the captured ones: addresses change)."""
        from polymodal.llm_core.cuda_graph import DecodeGraphs

        self.graphs = None
        if self.graph_batch > 0:
            self.graphs = DecodeGraphs(self.net, self.kv_caches, self.graph_batch,
                                       self.max_blocks, False)  # fmt: skip

    def capture(self) -> None:
        """Capture the draft's one-token steps (CUDA, the Triton backend)."""
        if self.graphs is not None:
            self.graphs.capture(False)

    @torch.inference_mode()
    def propose(self, kv, reqs: list, rooms: list[int], vocab_size: int) -> list[list[int]]:
        """Greedy drafts for `reqs` (each decoding: its last token known, not yet computed),
        at most `rooms[i]` each; [] for a sequence whose slots do not fit the pool now, whose
        context the draft cannot embed, or whose catch-up waits for the next step. `kv`: the
        target's `KVCacheManager`, which allocates the step's slots; `vocab_size`: ids the
        target's LM head produces (drafts end before one it cannot). The drafts stay on the
        device from step to step and are read back once."""
        runs, live, budget = [], [], self.max_step_tokens
        for i, (req, room) in enumerate(zip(reqs, rooms)):
            if room <= 0 or budget <= 0 or not kv.allocate_slots(req, 1 + room):
                continue
            state = req.draft_state
            if state is None or state.table is not req.block_tables[0]:
                state = req.draft_state = DraftState(req.block_tables[0])
            start, known = state.computed(req), req.num_known_tokens
            end = min(known, start + budget)
            ids = [req.token_id(p) for p in range(start, end)]
            if max(ids) >= self.vocab_size:  # an id past the draft's embeddings
                continue
            budget -= end - start
            state.valid, state.fed = end, ()
            if end == known:  # caught up: drafts this step
                live.append((i, req, room, len(live)))
            runs.append((req, start, ids, end == known))
        drafts: list[list[int]] = [[] for _ in reqs]
        if not runs:
            return drafts
        first = self._forward(runs)
        live.sort(key=lambda entry: -entry[2])  # most room first: each step's rows a prefix
        order = torch.tensor([row for *_, row in live], dtype=torch.int64, device=first.device)
        steps = [first[order]]  # per step, one id per sequence still drafting, in `live` order
        for step in range(1, max((room for _, _, room, _ in live), default=0)):
            n = sum(room > step for _, _, room, _ in live)
            steps.append(self._step([req for _, req, _, _ in live[:n]], step, steps[-1][:n]))
        read_back(drafts, live, steps)
        for i, req, room, _ in live:
            req.draft_state.fed = tuple(drafts[i][: room - 1])  # the drafts it ran
        trim(drafts, live, vocab_size)
        return drafts

    def _step(self, reqs: list, step: int, prev: torch.Tensor) -> torch.Tensor:
        """One token per sequence of `reqs`: its draft number `step` (`prev`, on the device),
        at the position after its context's end plus `step - 1`; returns the next drafts (a
        copy: the graph's buffer is rewritten by the next replay)."""
        n = len(reqs)
        positions = [req.num_known_tokens + step - 1 for req in reqs]
        hb = one_token_batch(reqs, positions, self.block_size)
        hb.sample_rows, hb.pending_rows, hb.pending_src = [*range(n)], [*range(n)], [*range(n)]
        graphs = self.graphs
        if graphs is not None and graphs.can_run(n, hb.max_blocks):
            return graphs.run(hb, prev)[1].clone()
        _, positions, meta = device_batch(hb, False, self.device)
        hidden = self.net(positions, self.net.embed(prev), self.kv_caches, meta)
        return self.net.compute_logits(hidden).argmax(-1)

    def _forward(self, runs: list) -> torch.Tensor:
        """Run `runs` (request, first position, token ids, samples) through the draft model,
        writing their keys; the greedy next token after each run that samples (on the
        device)."""
        hb = catch_up_batch(runs, self.block_size)
        input_ids, positions, meta = device_batch(hb, False, self.device)
        hidden = self.net(positions, self.net.embed(input_ids), self.kv_caches, meta)
        rows = torch.tensor(hb.sample_rows, dtype=torch.int64, device=hidden.device)
        if not hb.sample_rows:  # catch-ups cut by the budget only: their keys are written
            return rows
        return self.net.compute_logits(hidden[rows]).argmax(-1)


def catch_up_batch(runs: list, block_size: int) -> HostBatch:
    """The flat batch of `runs` (request, first position, token ids, samples, ...): each run's
    tokens at its positions, slots from the request's table, a sample row at each run's last
    token when it samples."""
    bs, hb = block_size, HostBatch(rows=[[]], slots=[[]])
    for req, start, ids, samples, *_ in runs:
        table = req.block_tables[0]
        end = start + len(ids)
        hb.ids.extend(ids)
        hb.rows[0].extend(range(start, end))
        hb.slots[0].extend(table[p // bs] * bs + p % bs for p in range(start, end))
        hb.query_lens.append(len(ids))
        hb.seq_lens.append(end)
        if samples:
            hb.sample_rows.append(len(hb.ids) - 1)
    hb.tables = [[req.block_tables[0] for req, *_ in runs]]
    hb.max_blocks = max(map(len, hb.tables[0]))
    return hb


def one_token_batch(reqs: list, positions: list[int], block_size: int) -> HostBatch:
    """A decode batch of one token per request at `positions` (ids filled in later)."""
    bs, n = block_size, len(reqs)
    hb = HostBatch(rows=[list(positions)], slots=[[]], ids=[0] * n, query_lens=[1] * n)
    for req, position in zip(reqs, positions):
        table = req.block_tables[0]
        hb.slots[0].append(table[position // bs] * bs + position % bs)
        hb.seq_lens.append(position + 1)
    hb.tables = [[req.block_tables[0] for req in reqs]]
    hb.max_blocks = max(map(len, hb.tables[0]))
    return hb


def read_back(drafts: list[list[int]], live: list, steps: list[torch.Tensor]) -> None:
    """Append to `drafts[i]` each step's ids (step s: one per sequence of the prefix of `live`
    still drafting), read from the device at once."""
    found, offset = torch.cat(steps).tolist(), 0
    for ids in steps:
        for (i, *_), token in zip(live, found[offset : offset + len(ids)]):
            drafts[i].append(token)
        offset += len(ids)


def trim(drafts: list[list[int]], live: list, vocab_size: int) -> None:
    """Cut each sequence's drafts before an id the target's LM head cannot produce, and to what
    its grammar allows in a row."""
    for i, req, *_ in live:
        cut = next((j for j, t in enumerate(drafts[i]) if t >= vocab_size), len(drafts[i]))
        del drafts[i][cut:]
        if drafts[i] and req.grammar is not None:
            del drafts[i][req.grammar.legal_drafts(drafts[i]) :]


def build_draft_model(cfg, target_layout: KVCacheLayout, device, target_config, target
                      ) -> DraftModel | None:  # fmt: skip
    """The drafter of `cfg.speculative_config` on `device`: a draft model, an EAGLE head over
    `target` (eagle.py) or Medusa heads (medusa.py); weights loaded, KV not yet allocated
    (`attach_kv`); None for n-gram lookup. Refuses what the draft path does not do, naming it."""
    from polymodal.llm_core.attention import get_backend
    from polymodal.llm_core.eagle import build_eagle
    from polymodal.llm_core.layers.linear import enable_gemv
    from polymodal.llm_core.loader import build_model, resolve_model_path
    from polymodal.llm_core.registry import model_class

    config = cfg.speculative_config
    if config is None or config.method == "ngram":
        return None
    what = "a draft model" if config.method == "draft_model" else f"method {config.method!r}"
    if cfg.tensor_parallel_size != 1:
        raise InvalidInputError(
            f"speculative_config with {what}: tensor_parallel_size > 1 is not supported"
        )
    if config.method == "medusa":  # heads over the hidden state: no KV of their own
        from polymodal.llm_core.medusa import build_medusa

        path = resolve_model_path(config.model, None, cfg.hf_token, cfg.download_dir)
        return build_medusa(cfg, config, device, target_config, path)
    kinds = {g.spec.kind for g in target_layout.groups}
    if target_layout.num_groups != 1 or kinds - {FULL, MLA}:
        raise InvalidInputError(
            f"speculative_config with {what}: {target_config.architecture}'s KV cache has "
            f"{sorted(kinds)} layers; drafters need one full-attention (or MLA) group"
        )
    given = config.model or str(target_config.model_dir)  # MTP: the target's own checkpoint
    path = resolve_model_path(given, None, cfg.hf_token, cfg.download_dir)
    if config.method != "draft_model":
        return build_eagle(cfg, config, device, target_config, target, path)
    draft_config = load_config(path, cfg.dtype, "generate")
    if device.type == "cpu" and draft_config.dtype == torch.float16:
        draft_config.dtype = torch.float32  # as the target's: fp16 matmuls are slow on CPU
    cls = model_class(draft_config.architecture)
    if draft_config.task != "generate" or supports_multimodal(cls):
        raise InvalidInputError(
            f"speculative_config model {config.model!r} ({draft_config.architecture}) is not a "
            "text generation model"
        )
    backend = get_backend(cfg.attention_backend, str(device), cfg.sdpa_shapes)
    max_positions = draft_config.max_position_embeddings + 1024
    net = build_model(draft_config, device, backend, max_positions, cfg.dummy_weights, cfg.seed)
    if cfg.decode_gemv:
        enable_gemv(net)
    layout = plan_layout(net.kv_cache_specs())
    kinds = {g.spec.kind for g in layout.groups}
    if layout.num_groups != 1 or kinds != {FULL}:
        raise InvalidInputError(
            f"speculative_config model {config.model!r} ({draft_config.architecture}) has "
            f"{sorted(kinds)} KV layers; a draft model needs one full-attention group"
        )
    for layer in net.attention_layers():
        layer.kv_group = 0
    return DraftModel(net, layout, cfg.block_size, device, draft_config)
