"""Which shapes reach torch's cuDNN SDPA (`SdpaShapes`), and the bucket lengths causal calls are
padded to.

torch keeps one cuDNN execution plan per exact call shape (batch, heads, query and key lengths,
strides, causal, LSE or not: `MHAParams` in aten/src/ATen/native/cudnn/MHA.cpp) in a
*thread-local* cache, and builds a missing one on the spot (cuDNN frontend: validate, operation
graph, heuristics, `build_plans`, which runtime-compiles the sm90 "fort native sdpa" kernel).
So every new prompt length or image size pays a plan build on its first call, in each thread
that runs it (the server's engine thread does not see plans the loading thread built). Our
Triton kernels compile once per constexpr variant (mask, `LONG_QUERIES` tile) and never per
length; torch's flash backend is compiled ahead of time.

Policies (`EngineConfig.sdpa_shapes`):

- "exact": every call goes to cuDNN at its own shape, built on first sight (before bucketing).
- "first": causal calls padded at the end to a bucket length (`bucket_up`: 8 lengths an
  octave, < 12.5% more rows), exact because a causal query never sees a later key; a chunk's
  cached context cut to a bucket (`bucket_down`), its remainder attended inside the chunk's
  own causal call (`causal_sdpa.attend`). A plan is built on a shape's first sight.
- "second" (default): bucketed as "first", but a shape runs our Triton kernel (exact, no build)
  until this thread sees it a second time; then its plan is built, once. A stream of varying
  sizes never waits for a build; repeated sizes get cuDNN from their second request (the
  tower's CUDA graph of a layout is captured on its second sight too).

Non-causal calls (the towers' full attention over equal segments) cannot be padded without a
mask: their exact shape is admitted by the same rule. `building(True)` admits every shape
(the load-time warm-up builds what it runs); `building(False)` admits none (it compiles the
Triton fallbacks).
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager

POLICIES = ("exact", "first", "second")
STEPS_PER_OCTAVE = 8  # bucket lengths between two powers of 2
MIN_STEP = 16  # bucket granularity below 128 rows (tests' tiny shapes; pages of 16)


def bucket_step(n: int) -> int:
    """The bucket spacing around length `n >= 1`: 1/8 of the power of 2 at or below it."""
    return max(MIN_STEP, (1 << (max(n, 1).bit_length() - 1)) // STEPS_PER_OCTAVE)


def bucket_up(n: int) -> int:
    """The smallest bucket length >= n (1024 -> 1024, 1025 -> 1152, 2725 -> 2816)."""
    step = bucket_step(n)
    return -(-n // step) * step


def bucket_down(n: int) -> int:
    """The largest bucket length <= n (0 below MIN_STEP; 16384 -> 16384, 20000 -> 18432)."""
    step = bucket_step(n)
    return n // step * step


class SdpaShapes:
    """Bucket lengths and cuDNN admission for one backend (see the module doc); the shapes seen
    and built are kept per thread, as torch keeps its plans."""

    def __init__(self, policy: str = "second") -> None:
        if policy not in POLICIES:
            raise ValueError(f"sdpa_shapes={policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self._local = threading.local()

    def _state(self):
        state = self._local
        if not hasattr(state, "built"):
            state.built, state.seen, state.forced = set(), Counter(), None
        return state

    def up(self, n: int) -> int:
        """The length a causal call of `n` rows is padded to."""
        return n if self.policy == "exact" else bucket_up(n)

    def down(self, n: int) -> int:
        """The cached-context length a chunk's context call takes (the rest joins its own)."""
        return n if self.policy == "exact" else bucket_down(n)

    def admit(self, key: tuple) -> bool:
        """Whether a cuDNN call of shape `key` runs now (False: run the Triton kernel)."""
        state = self._state()
        if state.forced is not None:
            if state.forced:
                state.built.add(key)
            return state.forced
        if key in state.built:
            return True
        state.seen[key] += 1
        if self.policy != "second" or state.seen[key] >= 2:
            state.built.add(key)
            return True
        return False

    def built(self) -> frozenset:
        """The shapes this thread has handed to cuDNN."""
        return frozenset(self._state().built)

    @contextmanager
    def building(self, admit: bool):
        """Within: every cuDNN shape is admitted (`admit`: and counted built), or none is."""
        state = self._state()
        before, state.forced = state.forced, admit
        try:
            yield
        finally:
            state.forced = before


def cudnn_key(q, k, v, causal: bool, gqa: bool = False) -> tuple | None:
    """The plan key of an SDPA call on `[b, heads, len, d]` views when torch would run it on
    cuDNN, else None (flash or the efficient kernel: no per-shape build)."""
    import torch
    from torch.nn.attention import SDPBackend

    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, causal, enable_gqa=gqa)
    if choice != SDPBackend.CUDNN_ATTENTION.value:
        return None
    return (tuple(q.shape), tuple(k.shape), q.stride(), k.stride(), q.dtype, causal)
