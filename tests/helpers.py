"""Shared test helpers: tiny checkpoints (built once per session) and HF references."""

from __future__ import annotations

import torch

from polymodal.demo_model import write_demo_checkpoint

_CACHE: dict = {}


def tiny_checkpoint(tmp_path_factory, arch: str, **overrides):
    """Path of a tiny random `arch` checkpoint, built once per test session."""
    key = (arch, repr(sorted(overrides.items())))
    if key not in _CACHE:
        _CACHE[key] = write_demo_checkpoint(tmp_path_factory.mktemp(arch), arch, **overrides)
    return _CACHE[key]


def hf_greedy(model, prompt_ids: list[int], steps: int):
    """HF reference: greedy tokens and the logits that chose each, by full re-forwarding."""
    ids = list(prompt_ids)
    logits_per_step = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float().cpu()
        logits_per_step.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :], logits_per_step


def record_logits(engine):
    """Wrap the engine runner's `sample_logits` (every sampled row's logits pass through it,
    decode graphs included); returns the list it appends [rows, vocab] fp32 copies to."""
    seen = []
    runner = engine.runner
    original = runner.sample_logits

    def sample_logits(reqs, logits, *args, **kwargs):
        seen.append(logits.clone())
        return original(reqs, logits, *args, **kwargs)

    runner.sample_logits = sample_logits
    return seen


def spec_for(q, kv_cache, scale, window=None, mask=None, softcap=None):
    """An `AttentionSpec` for kernel tests: head counts from `q [tokens, heads, d]` and the
    `[2, blocks, page, kv_heads, d]` cache; sliding when `window` is given, unless `mask` says
    otherwise (`Mask.CHUNKED` reads `window` as the chunk size)."""
    from polymodal.llm_core.attention.spec import AttentionSpec, Mask

    if mask is None:
        mask = Mask.CAUSAL if window is None else Mask.SLIDING
    kv_heads = kv_cache.shape[3] if kv_cache.dim() == 5 else kv_cache.shape[1]
    return AttentionSpec(q.shape[1], kv_heads, q.shape[2], scale, mask, window, softcap=softcap)
