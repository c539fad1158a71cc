"""Speculative decoding with Medusa heads (vLLM's `{"method": "medusa", "model": DIR,
"num_speculative_tokens": k}`, k <= the checkpoint's heads; the heads: models/medusa.py).

The heads read the target's last hidden state at the position whose token was sampled last,
so the runner hands the drafter each step's hidden rows (`record`; of the decode and prefill
graphs too) and each sequence keeps the rows of its last k + 1 computed positions (a verify
step's: the target may accept any prefix of the drafts). Before a drafting step (`propose`) a
sequence's row at its last computed position goes through the first k heads in one batched
pass; their argmax ids, read back at once, are its drafts. No KV cache, no catch-up: unlike a
draft model or an EAGLE head, Medusa works over any KV layout (sliding windows included).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from polymodal.llm_core.draft_model import trim
from polymodal.llm_core.errors import InvalidInputError, ModelLoadError
from polymodal.llm_core.host_copy import to_device


class MedusaDrafter:
    """Medusa heads over the engine's target: its hidden rows, its drafts (the drafter's
    contract, as draft_model.DraftModel's: `record`, `propose`, `attach_kv`, `capture`)."""

    records = True  # the runner hands it every step's outputs
    block_bytes = 0  # no KV pages of its own
    kv_caches: list = []

    def __init__(self, net, device, k: int):
        self.net = net
        self.device = device
        self.keep = k + 1  # rows a sequence keeps: a verify step's
        self.max_step_tokens = 0  # (set by Speculation; no catch-up here)

    def attach_kv(self, num_blocks: int, max_len: int, graph_batch: int) -> MedusaDrafter:
        return self

    def capture(self) -> None:
        """(Nothing to capture: one batched pass of small GEMMs a drafting step.)"""

    def reset_graphs(self) -> None:
        """(No graphs.)"""

    def record(self, sched, hidden: torch.Tensor, aux: list[torch.Tensor]) -> None:
        """Keep each scheduled sequence's last `keep` rows of this step, with the position of
        the first (copied once for the step: a graph rewrites its outputs)."""
        index, spans, offset = [], [], 0
        for req, n in zip(sched.requests, sched.num_new_tokens):
            m = min(n, self.keep)
            index.extend(range(offset + n - m, offset + n))
            spans.append((req, req.num_computed_tokens + n - m, m))
            offset += n
        if not index:
            return
        rows = hidden[to_device(index, torch.int64, hidden.device)]
        at = 0
        for req, start, m in spans:
            req.draft_state = (start, rows[at : at + m])
            at += m

    @torch.inference_mode()
    def propose(self, kv, reqs: list, rooms: list[int], vocab_size: int) -> list[list[int]]:
        """Up to `room` drafts for each of `reqs` (the heads' greedy ids at its last computed
        position's row; none where that row was not seen: a prefix hit, a prompt given as
        embeddings)."""
        live, rows = [], []
        for i, (req, room) in enumerate(zip(reqs, rooms)):
            state = req.draft_state
            if not isinstance(state, tuple) or room <= 0:
                continue
            start, kept = state
            j = req.num_computed_tokens - 1 - start
            if 0 <= j < kept.shape[0]:
                live.append((i, req, min(room, self.net.num_heads)))
                rows.append(kept[j])
        drafts: list[list[int]] = [[] for _ in reqs]
        if not live:
            return drafts
        count = max(room for *_, room in live)
        ids = self.net(torch.stack(rows), count).t().tolist()  # [B, count], one read back
        for (i, _, room), found in zip(live, ids):
            drafts[i] = found[:room]
        trim(drafts, live, vocab_size)
        return drafts


def build_medusa(cfg, config, device, target_config, path) -> MedusaDrafter:
    """The Medusa heads of `config.model` (at `path`) over a target of `target_config`, in
    its dtype on `device`; refuses a checkpoint that does not fit the target, naming why."""
    from polymodal.llm_core.models.medusa import MedusaHeads

    path = Path(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: no readable Medusa config.json ({exc})") from exc
    fmt = "medusa" if "medusa_num_heads" in raw else "vllm"
    heads = raw.get("medusa_num_heads", raw.get("num_heads"))
    layers = raw.get("medusa_num_layers", raw.get("num_hidden_layers", 1))
    hidden = raw.get("hidden_size", target_config.hidden_size)
    vocab = raw.get("vocab_size", target_config.vocab_size)
    name = config.model
    if not isinstance(heads, int) or heads < 1:
        raise InvalidInputError(f"speculative_config model {name!r}: config.json names no heads")
    if hidden != target_config.hidden_size or vocab != target_config.vocab_size:
        raise InvalidInputError(
            f"speculative_config model {name!r}: heads of hidden size {hidden} over {vocab} ids "
            f"do not fit the target ({target_config.hidden_size}, {target_config.vocab_size})"
        )
    if config.num_speculative_tokens > heads:
        raise InvalidInputError(
            f"speculative_config num_speculative_tokens={config.num_speculative_tokens}: "
            f"the Medusa checkpoint {name!r} has {heads} heads"
        )
    truncated = raw.get("truncated_vocab_size") or vocab
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(target_config.dtype)
    try:
        with torch.device(device):
            bias = fmt == "medusa" or raw.get("medusa_fc_bias", False)
            net = MedusaHeads(
                hidden, truncated, heads, layers, bias, raw.get("original_lm_head", False),
                raw.get("logit_scale", 1.0), truncated < vocab,
            )  # fmt: skip
    finally:
        torch.set_default_dtype(default_dtype)
    if cfg.dummy_weights:
        for param in net.parameters():
            torch.nn.init.normal_(param, std=0.02)
        if truncated < vocab:
            net.token_map = torch.arange(truncated, device=device)
    else:
        net.load_weights(dict(_tensors(path)), str(path), fmt)
    return MedusaDrafter(net.eval(), device, config.num_speculative_tokens)


def _tensors(path: Path):
    """The checkpoint's tensors: safetensors / `pytorch_model*.bin`, or FasterDecoding's
    `medusa_lm_head.pt`."""
    from polymodal.llm_core.weights import iter_checkpoint

    pt = path / "medusa_lm_head.pt"
    if pt.exists() and not any(path.glob("*.safetensors")):
        try:
            yield from torch.load(pt, map_location="cpu", weights_only=True).items()
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"{pt}: unreadable PyTorch weights file ({exc})") from exc
        return
    yield from iter_checkpoint(path)
