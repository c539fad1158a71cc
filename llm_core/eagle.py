"""Speculative decoding with an EAGLE / EAGLE-3 head (vLLM's `{"method": "eagle" | "eagle3",
"model": DIR, "num_speculative_tokens": k}`; the head itself: models/eagle.py).

The head drafts from the target's features, so the runner hands it each step's outputs
(`record`: the target's hidden rows, and for EAGLE-3 the residual streams of three of its
layers, taken by forward pre-hooks and kept by the decode / prefill graphs as static outputs),
and each sequence keeps the feature rows of the positions its head has not run yet. Before a
drafting step (`propose`), like a draft model (draft_model.py: the pages at the target's block
ids, the step's slots allocated first), the head runs the rows its cache lacks, position p
taking the token at p + 1 with the target's feature at p (the last computed position's row
predicts the first draft), then k - 1 one-token steps on its own output features, all on the
device, read back once. Features of drafts the target rejected are dropped; the head's keys at
the draft positions are rewritten by the next catch-up from the target's true features.

A prefix hit (or any position whose target features were never seen) is skipped: the head
reads the keys its blocks hold (written by the head of the request that computed them).
The head's one-token steps replay its own CUDA graphs (eagle_graphs.py; the catch-up runs
eagerly). With `disable_by_batch_size`, steps that do not draft still record their features
(up to `MAX_FEATURE_ROWS` a sequence), read when drafting resumes. Not done: tensor
parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polymodal.llm_core.draft_model import (
    DraftModel,
    DraftState,
    catch_up_batch,
    one_token_batch,
    read_back,
    trim,
)
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.kv_cache_spec import FULL, MLA, plan_layout
from polymodal.llm_core.speculative import MTP_METHODS
from polymodal.llm_core.step_batch import device_batch

# Feature rows a sequence keeps for its head at most: while steps do not draft
# (`disable_by_batch_size`), each adds one; past this the oldest go (a row of a 7B's features
# is 7 KiB in bf16: 3.5 MiB a sequence at most) and the head's keys there stay as they were.
MAX_FEATURE_ROWS = 512


@dataclass
class FeatureState(DraftState):
    """A sequence's head cache (`DraftState`) and the target feature rows from `start` on."""

    rows: torch.Tensor | None = None
    start: int = 0

    def keep(self, start: int, rows: torch.Tensor) -> None:
        """Feature rows of positions `start`...; a gap or an earlier start begins anew; at most
        `MAX_FEATURE_ROWS` (the oldest go: the head skips their positions)."""
        held = 0 if self.rows is None else self.rows.shape[0]
        if self.rows is None or not self.start <= start <= self.start + held:
            self.rows, self.start = rows, start
        else:  # rows past `start` were drafts the target rejected
            self.rows = torch.cat([self.rows[: start - self.start], rows])
        extra = self.rows.shape[0] - MAX_FEATURE_ROWS
        if extra > 0:
            self.rows, self.start = self.rows[extra:], self.start + extra


class EagleDrafter(DraftModel):
    """An EAGLE head over the engine's target model: its KV pages, its features, its drafts."""

    records = True  # the runner hands it every step's outputs

    def reset_graphs(self) -> None:
        """Uncaptured graphs of the head's one-token steps (eagle_graphs.py)."""
        from polymodal.llm_core.eagle_graphs import HeadGraphs

        self.graphs = None
        if self.graph_batch > 0:
            self.graphs = HeadGraphs(self.net, self.kv_caches, self.graph_batch,
                                     self.max_blocks, self.block_size)  # fmt: skip

    def capture(self) -> None:
        if self.graphs is not None:
            self.graphs.capture()

    def record(self, sched, hidden: torch.Tensor, aux: list[torch.Tensor]) -> None:
        """Keep the features of the positions each scheduled sequence computed this step
        (before the scheduler counts them); the target's hidden rows are copied (a graph
        rewrites its outputs), EAGLE-3's `fc` output is fresh already."""
        if self.net.variant == "eagle3" and len(aux) != 3:
            return  # a path that kept no residual streams (none here: each graph keeps them)
        feature = self.net.feature(hidden, aux)
        static = feature is hidden  # the target's own rows: a graph's buffer, rewritten later
        offset = 0
        for req, n in zip(sched.requests, sched.num_new_tokens):
            state = req.draft_state
            if state is None or state.table is not req.block_tables[0]:
                state = req.draft_state = FeatureState(req.block_tables[0])
            rows = feature[offset : offset + n]
            state.keep(req.num_computed_tokens, rows.clone() if static else rows)
            offset += n

    @torch.inference_mode()
    def propose(self, kv, reqs: list, rooms: list[int], vocab_size: int) -> list[list[int]]:
        """As `DraftModel.propose`, from the sequences' feature rows."""
        runs, live, budget = [], [], self.max_step_tokens
        for i, (req, room) in enumerate(zip(reqs, rooms)):
            state = req.draft_state
            if state is None or state.rows is None or room <= 0 or budget <= 0:
                continue
            if state.table is not req.block_tables[0] or not kv.allocate_slots(req, 1 + room):
                continue
            end = req.num_computed_tokens  # features known below it (the last token's is not)
            start = min(max(state.valid, state.start), end - 1)
            if start < state.start:
                continue
            stop = min(end, start + budget)
            ids = [req.token_id(p + 1) for p in range(start, stop)]
            if max(ids) >= self.vocab_size:
                continue
            budget -= stop - start
            rows = state.rows[start - state.start : stop - state.start]
            if stop == end:  # caught up: drafts this step
                live.append((i, req, room, len(live)))
            runs.append((req, start, ids, stop == end, rows))
            state.valid = stop
        drafts: list[list[int]] = [[] for _ in reqs]
        if not runs:
            return drafts
        first, feature = self._forward(runs)
        for req, *_ in runs:  # keep the last row used: a catch-up reruns at least it
            state = req.draft_state
            state.rows, state.start = state.rows[state.valid - 1 - state.start :], state.valid - 1
        live.sort(key=lambda entry: -entry[2])  # most room first: each step's rows a prefix
        order = torch.tensor([row for *_, row in live], dtype=torch.int64, device=first.device)
        tokens, feature = first[order], feature[order]
        steps = [tokens]
        for step in range(1, max((room for _, _, room, _ in live), default=0)):
            n = sum(room > step for _, _, room, _ in live)
            tokens, feature = self._step([r for _, r, _, _ in live[:n]], step, tokens[:n],
                                         feature[:n])  # fmt: skip
            steps.append(tokens)
        read_back(drafts, live, steps)
        trim(drafts, live, vocab_size)
        return drafts

    def _step(self, reqs, step: int, tokens, feature):
        """Draft `step` (`tokens`, on the device) of each sequence with the head's own
        feature, at the position after the last computed one plus `step - 1` (a graph replay
        where one fits)."""
        positions = [req.num_computed_tokens + step - 1 for req in reqs]
        hb = one_token_batch(reqs, positions, self.block_size)
        if self.graphs is not None and self.graphs.can_run(len(reqs), hb.max_blocks):
            return self.graphs.run(hb.rows[0], hb.slots[0], hb.tables[0], tokens, feature)
        _, positions, meta = device_batch(hb, False, self.device)
        out, feature = self.net(positions, self.net.embed(tokens), feature, self.kv_caches, meta)
        return self.net.greedy(out), feature

    def _forward(self, runs: list):
        """The catch-up runs (request, first position, token ids, samples, feature rows): keys
        written; the first drafts and the features after the runs that sample."""
        hb = catch_up_batch(runs, self.block_size)
        input_ids, positions, meta = device_batch(hb, False, self.device)
        rows = torch.cat([r for *_, r in runs])
        out, feature = self.net(positions, self.net.embed(input_ids), rows, self.kv_caches, meta)
        index = torch.tensor(hb.sample_rows, dtype=torch.int64, device=out.device)
        if not hb.sample_rows:
            return index, feature[:0]
        return self.net.greedy(out[index]), feature[index]


def build_eagle(cfg, config, device, target_config, target, path) -> EagleDrafter:
    """The head of `config` (a `SpeculativeConfig`: eagle / eagle3 from `path`, or mtp: the
    target checkpoint's own MTP layer) over `target`, its layers' KV not yet allocated."""
    from polymodal.llm_core.attention import get_backend
    from polymodal.llm_core.loader import _randomize
    from polymodal.llm_core.weights import run_post_load_hooks

    backend = get_backend(cfg.attention_backend, str(device), cfg.sdpa_shapes)
    max_positions = target_config.max_position_embeddings + 1024
    make = _mtp_head if config.method in MTP_METHODS else _eagle_head
    head_config, tensors, build = make(cfg, config, target_config, path)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(head_config.dtype)
    try:
        with torch.device(device):
            head = build(backend, max_positions, target)
    finally:
        torch.set_default_dtype(default_dtype)
    if cfg.dummy_weights:
        _randomize(head)
        run_post_load_hooks(head)
    else:
        head.load_weights(tensors.items(), source=str(path))
    head.eval()
    if config.method == "eagle3":
        from polymodal.llm_core.aux_states import aux_hooks
        from polymodal.llm_core.models.eagle import aux_layer_ids

        aux_hooks(target, aux_layer_ids(head_config.text_config, target_config.num_layers))
    layout = plan_layout(head.kv_cache_specs())
    if layout.num_groups != 1 or {g.spec.kind for g in layout.groups} - {FULL, MLA}:
        raise InvalidInputError(
            f"speculative_config model {config.model!r}: its layers are not full attention"
        )
    for layer in head.attention_layers():
        layer.kv_group = 0
    head_config.vocab_size = target_config.vocab_size  # it embeds with the target's table
    return EagleDrafter(head, layout, cfg.block_size, device, head_config)


def _eagle_head(cfg, config, target_config, path):
    """(head config, tensors, build) of an EAGLE / EAGLE-3 head folder."""
    from polymodal.llm_core.config import load_config
    from polymodal.llm_core.models.eagle import EagleHead
    from polymodal.llm_core.weights import iter_checkpoint

    head_config = load_config(path, target_config.dtype, "generate",
                              {"architectures": ["LlamaForCausalLM"]})  # fmt: skip
    head_config.dtype = target_config.dtype
    if head_config.hidden_size != target_config.hidden_size:
        raise InvalidInputError(
            f"speculative_config model {config.model!r}: its hidden size "
            f"{head_config.hidden_size} is not the target's {target_config.hidden_size}"
        )
    tensors = {} if cfg.dummy_weights else dict(iter_checkpoint(path))
    names = set(tensors)
    if not names and config.method == "eagle3":  # dummy weights: the published layout's
        names = {"lm_head.weight", "d2t"}
    hidden = target_config.hidden_size
    return (
        head_config,
        tensors,
        lambda backend, max_positions, target: EagleHead(
            head_config, backend, max_positions, config.method, target, names, hidden
        ),
    )


def _mtp_head(cfg, config, target_config, path):
    """(config, tensors, build) of the MTP layer in the target's checkpoint `path`."""
    from dataclasses import replace

    from polymodal.llm_core.models.mtp import DeepSeekMTPHead
    from polymodal.llm_core.weights import iter_checkpoint

    layers = getattr(target_config.text_config, "num_nextn_predict_layers", 0) or 0
    if target_config.architecture != "DeepseekV3ForCausalLM" or not layers:
        raise InvalidInputError(
            f"speculative_config method {config.method!r}: {target_config.architecture} has no "
            "multi-token-prediction layer (num_nextn_predict_layers; DeepSeek-V3 / R1 do)"
        )
    layer = target_config.num_layers  # the first MTP layer (vLLM runs it for every draft)
    prefix = f"model.layers.{layer}."
    tensors = {}
    if not cfg.dummy_weights:
        tensors = {n: t for n, t in iter_checkpoint(path) if n.startswith(prefix)}
        if not tensors:
            raise InvalidInputError(
                f"speculative_config method {config.method!r}: {path} holds no {prefix}* "
                "tensors (the MTP layer)"
            )
    head_config = replace(target_config)
    return (
        head_config,
        tensors,
        lambda backend, max_positions, target: DeepSeekMTPHead(
            head_config, backend, max_positions, target, layer
        ),
    )
