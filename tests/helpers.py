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


def record_sdpa_contexts(engine, causal_sdpa: bool | None) -> list:
    """Set the engine's attention backends' `causal_sdpa` and wrap their `sdpa_prefill` and
    `fresh_prefill`; returns the list it appends the cached context of every routed call to (one
    per layer and step)."""
    from polymodal.llm_core.attention.layer import AttentionLayer

    contexts: list = []
    modules = engine.runner.model.modules()
    backends = {id(m.backend): m.backend for m in modules if isinstance(m, AttentionLayer)}
    for backend in backends.values():
        backend.causal_sdpa = causal_sdpa
        original = backend.sdpa_prefill

        def sdpa_prefill(q, k, v, kv_cache, meta, spec, original=original):
            out = original(q, k, v, kv_cache, meta, spec)
            if out is not None:
                # the routed chunk: the step's last sequence (any before it decode one token)
                contexts.append(meta.seq_lens_cpu[-1] - meta.query_lens_cpu[-1])
            return out

        backend.sdpa_prefill = sdpa_prefill
        fresh = backend.fresh_prefill

        def fresh_prefill(q, k, v, rope, kv_cache, meta, spec, fresh=fresh):
            out = fresh(q, k, v, rope, kv_cache, meta, spec)
            if out is not None:  # a fresh chunk, rotated and stored in the same launch
                contexts.append(0)
            return out

        backend.fresh_prefill = fresh_prefill
    return contexts


def record_logits_by_request(engine) -> dict:
    """Like `record_logits`, keyed by request: {request id: [logits row per sampled token]}."""
    seen: dict = {}
    runner = engine.runner
    original = runner.sample_logits

    def sample_logits(reqs, logits, *args, **kwargs):
        for req, row in zip(reqs, logits):
            seen.setdefault(req.request_id.split("#")[0], []).append(row.clone())
        return original(reqs, logits, *args, **kwargs)

    runner.sample_logits = sample_logits
    return seen


def assert_matches_transformers(path, prompts, steps=12, logit_steps=9, **engine_kwargs):
    """Greedy tokens identical to transformers' and fp32 logits within 1e-4 (prefill and the
    first `logit_steps - 1` decode steps) for every prompt, run together in one engine."""
    import transformers as tf

    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.sampling_params import SamplingParams

    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = [hf_greedy(hf, p, steps) for p in prompts]
    engine_kwargs = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 128, **engine_kwargs}
    engine = Engine(str(path), **engine_kwargs)
    seen = record_logits_by_request(engine)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    final = engine.run_until_done()
    for i, (rid, (ref_tokens, ref_logits)) in enumerate(zip(ids, refs)):
        assert final[rid].outputs[0].token_ids == ref_tokens, f"prompt {i}: greedy tokens differ"
        for step in range(min(logit_steps, steps)):
            diff = (seen[rid][step].cpu() - ref_logits[step]).abs().max().item()
            assert diff <= 1e-4, f"prompt {i} step {step}: max abs logit diff {diff:.2e}"
    return engine


def with_pair_tokenizer(path):
    """Give the tiny checkpoint's tokenizer BERT's pair template: [CLS] a [SEP] b [SEP] with
    segment ids 0 then 1 (stand-ins for [CLS] / [SEP]: the demo tokenizer's specials)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    cls, sep = "<|endoftext|>", "<|im_end|>"
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in (cls, sep)]
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=specials
    )
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    tok.init_kwargs["model_input_names"] = tok.model_input_names
    tok.save_pretrained(path)
    return path


def run_preempted(engine, prompts: list, params) -> list[list[int]]:
    """The outputs' token ids of `prompts` run together on `engine`, whose KV pool is meant to
    be too small for them all: asserts that some request was preempted."""
    ids = [engine.add_request(p, params) for p in prompts]
    seqs = [engine._groups[i].seqs[0] for i in ids]
    final = engine.run_until_done()
    assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to force preemption"
    return [final[i].outputs[0].token_ids for i in ids]
