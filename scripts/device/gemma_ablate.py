"""Where Gemma-3-12B's batch-1 decode step goes beyond its GEMVs: the step timed with one kind
of non-GEMV kernel left out at a time (its output replaced by its input, so the graphs hold
everything else), then with all of them out (the GEMV chain alone). Dummy bf16 weights, 256
tokens after 32, one engine per variant in this process (`bench_text_decode.variant_ms`).
The tokens are garbage in the ablated variants; only the times mean anything. Under PDL a
profiler's per-kernel durations include each kernel's wait on the one before, so this is how
the marginal cost of each kind is read (issue 16: >= 85% of the floor)."""

import sys

import torch

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.llm_core.attention import layer as attention_layer
from polymodal.llm_core.layers import linear
from polymodal.llm_core.models import gemma3

sys.path.insert(0, "scripts")
from bench_text_decode import variant_ms  # noqa: E402

KEEP = {
    "sandwich": gemma3.sandwich_norm,
    "qk_norm": gemma3.qk_norm,
    "gelu": linear.gelu_tanh_and_mul,
    "attention": attention_layer.AttentionLayer.forward,
}


def no_attention(self, q, k, v, rope, kv_cache, meta):
    return q.reshape(q.shape[0], -1)  # o_proj's input width (heads x head_dim)


STUBS = {
    "sandwich": lambda post, pre, y, residual: (y, residual if residual is not None else y),
    "qk_norm": lambda q_norm, k_norm, q, k: (q, k),
    "gelu": lambda x: x[..., : x.shape[-1] // 2],
    "attention": no_attention,
}


def set_kinds(off: set[str]) -> None:
    gemma3.sandwich_norm = STUBS["sandwich"] if "sandwich" in off else KEEP["sandwich"]
    gemma3.qk_norm = STUBS["qk_norm"] if "qk_norm" in off else KEEP["qk_norm"]
    linear.gelu_tanh_and_mul = STUBS["gelu"] if "gelu" in off else KEEP["gelu"]
    attention_layer.AttentionLayer.forward = (
        STUBS["attention"] if "attention" in off else KEEP["attention"]
    )


model, bw = resolve_bench_model("gemma-3-12b"), measure_bandwidth()
for off in ([], ["sandwich"], ["qk_norm"], ["gelu"], ["attention"], list(STUBS)):
    set_kinds(set(off))
    variant_ms("without " + "+".join(off) if off else "all kernels", model, bw)
    torch.cuda.empty_cache()
