"""Device A/B switches for processes a bench starts itself (a server and its engine process):
on PYTHONPATH, read at every interpreter's start. `AB_ONE_GROUP=1`: equal tower segments as one
SDPA call, the grouping before the thirty-seventh session (`triton_backend.segment_groups`)."""

import os

if os.environ.get("AB_ONE_GROUP") == "1":
    from polymodal.llm_core.attention import triton_backend

    triton_backend.segment_groups = lambda segments: [segments]
