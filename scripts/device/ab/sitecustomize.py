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
