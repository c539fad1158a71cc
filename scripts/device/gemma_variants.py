"""Gemma-3-12B batch-1 decode (dummy bf16 weights, 256 tokens after 32) with and without its
one-row folds: the sandwich norms (o_proj / down do the post-norm and the add in their
epilogue, qkv / gate_up the next pre-norm as they load x; `Linear.fused(post_norm=)`) against
the `sandwich_norm` kernel between them (the twentieth session's profile: 4.2 us a call, 96 a
token), and GELU-tanh * up as down loads x (`gelu_tanh=True`) against its kernel (1.1 us, 48
a token). One engine per variant in this process, the first again last (drift). Prints ms a
token and % of the floor."""

import sys

from polymodal.bench import resolve_bench_model
from polymodal.bench.engine import measure_bandwidth
from polymodal.llm_core.layers.activation import gelu_tanh_and_mul
from polymodal.llm_core.layers.linear import Linear

sys.path.insert(0, "scripts")
from bench_text_decode import variant_ms  # noqa: E402

folded = Linear.fused


def without(sandwich: bool, gelu: bool):
    """`Linear.fused` without the sandwich fold (the plain product, `sandwich_norm` after) and /
    or without the GELU fold (the activation kernel first)."""

    def fused(self, x, residual=None, silu_mul=False, post_norm=None, gelu_tanh=False):
        if gelu and gelu_tanh:
            x, silu_mul, gelu_tanh = gelu_tanh_and_mul(x), False, False
        if sandwich and post_norm is not None:
            return folded(self, x, silu_mul=silu_mul, gelu_tanh=gelu_tanh)
        return folded(self, x, residual, silu_mul, post_norm, gelu_tanh)

    return fused


def run(label, sandwich=False, gelu=False):
    Linear.fused = without(sandwich, gelu) if sandwich or gelu else folded
    variant_ms(label, model_dir, bw, max_model_len=4096)


model_dir = resolve_bench_model("gemma-3-12b")
bw = measure_bandwidth()
run("all folded")
run("sandwich_norm kernel", sandwich=True)
run("GELU kernel", gelu=True)
run("neither (before)", sandwich=True, gelu=True)
run("all folded again")
