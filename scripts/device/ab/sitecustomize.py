"""Device A/B switches for processes a bench starts itself (a server and its engine process):
on PYTHONPATH, read at every interpreter's start. `AB_SEGMENTS=one`: a step's equal tower
segments as one SDPA call (before the thirty-seventh session); `AB_SEGMENTS=pow2`: as pure
power-of-2 pieces (that session's first rule, measured on an H200), instead of
`triton_backend.segment_groups`. `AB_MLLAMA=mask`: Mllama's tower attention as one
masked SDPA call over all rows (before the thirty-eighth session's unmasked pair of calls)."""

import os

_RULE = os.environ.get("AB_SEGMENTS")
if _RULE in ("one", "pow2"):
    from polymodal.llm_core.attention import triton_backend

    def _groups(segments: int) -> list[int]:
        if _RULE == "one":
            return [segments]
        return [1 << b for b in reversed(range(segments.bit_length())) if segments >> b & 1]

    triton_backend.segment_groups = _groups

if os.environ.get("AB_MLLAMA") == "mask":  # Mllama's tower attention as one masked SDPA call
    import torch
    import torch.nn.functional as F

    from polymodal.encoders import mllama

    def _masked(self, x, real):
        n, length, _ = x.shape
        q, k, v = (
            p(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        rows = torch.arange(length, device=x.device) < real
        allowed = (rows[:, None] | rows[None, :]).expand(n, 1, length, length).contiguous()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1))

    mllama.MllamaVisionAttention.forward = _masked

_STEPLOG = os.environ.get("AB_STEPLOG")  # a file: each request's arrival and each step's work
if _STEPLOG:
    import time

    from polymodal.llm_core import scheduler as _scheduler

    _log = open(f"{_STEPLOG}.{os.getpid()}", "a", buffering=1)
    _add, _schedule = _scheduler.Scheduler.add, _scheduler.Scheduler.schedule

    def _logged_add(self, req):
        _log.write(f"add {time.monotonic():.6f}\n")
        return _add(self, req)

    def _logged_schedule(self):
        out = _schedule(self)
        prefill = decode = done = images = 0
        for req, n in zip(out.requests, out.num_new_tokens):
            prompt = len(req.prompt_token_ids)
            if req.num_computed_tokens >= prompt:
                decode += 1
                continue
            prefill += n
            images += len(req.mm_items) if req.num_computed_tokens == 0 else 0
            done += req.num_computed_tokens + n >= prompt
        _log.write(f"step {time.monotonic():.6f} {prefill} {decode} {done} {images}\n")
        return out

    _scheduler.Scheduler.add, _scheduler.Scheduler.schedule = _logged_add, _logged_schedule
