"""Device A/B switches for processes a bench starts itself (a server and its engine process):
on PYTHONPATH, read at every interpreter's start. `AB_SEGMENTS=one`: a step's equal tower
segments as one SDPA call (before the thirty-seventh session); `AB_SEGMENTS=pow2`: as pure
power-of-2 pieces (that session's first rule, measured on an H200), instead of
`triton_backend.segment_groups`."""

import os

_RULE = os.environ.get("AB_SEGMENTS")
if _RULE in ("one", "pow2"):
    from polymodal.llm_core.attention import triton_backend

    def _groups(segments: int) -> list[int]:
        if _RULE == "one":
            return [segments]
        return [1 << b for b in reversed(range(segments.bit_length())) if segments >> b & 1]

    triton_backend.segment_groups = _groups
