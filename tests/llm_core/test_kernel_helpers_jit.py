"""Every function a Triton kernel calls is itself `@triton.jit`. The interpreter
(`TRITON_INTERPRET=1`, the CPU tests) runs plain Python helpers without complaint; the compiler
refuses them on a GPU ("Unsupported function referenced"), so this is checked here, on the
kernels' source."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

triton = pytest.importorskip("triton")
# what `@triton.jit` returns: a JITFunction, or under the interpreter an InterpretedFunction
KERNEL_TYPES = tuple(
    cls
    for cls in (
        getattr(triton.runtime.jit, "JITFunction", None),
        getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None),
    )
    if cls is not None
)

MODULES = [
    "polymodal.llm_core.attention.triton_decode",
    "polymodal.llm_core.attention.decode_tiles",
    "polymodal.llm_core.attention.triton_store",
    "polymodal.llm_core.attention.triton_mla",
    "polymodal.llm_core.attention.triton_prefill",
    "polymodal.llm_core.attention.prefill_tiles",
    "polymodal.llm_core.attention.prefill_splits",
    "polymodal.llm_core.attention.sdpa_pack",
    "polymodal.llm_core.lora.triton_lora",
    "polymodal.llm_core.layers.gemv",
    "polymodal.llm_core.layers.gemv_folds",
    "polymodal.llm_core.layers.triton_moe",
    "polymodal.llm_core.layers.int4_kernels",
    "polymodal.llm_core.layers.int4_gemv",
    "polymodal.llm_core.layers.triton_ops",
    "polymodal.llm_core.layers.fp8_kernels",
    "polymodal.llm_core.layers.fp8_gemv",
    "polymodal.llm_core.layers.moe_decode",
    "polymodal.llm_core.layers.moe_route",
    "polymodal.llm_core.layers.moe_tiles",
    "polymodal.llm_core.layers.moe_layer",
    "polymodal.processors.triton_pixels",
]


def called_names(fn) -> set[str]:
    """Bare names called in a JIT function's body (`helper(...)`, not `tl.x(...)`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    return {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }


@pytest.mark.parametrize("name", MODULES)
def test_kernels_call_only_jit_helpers(name):
    module = importlib.import_module(name)
    kernels = {k: v for k, v in vars(module).items() if isinstance(v, KERNEL_TYPES)}
    assert kernels, f"{name} defines no Triton kernel"
    plain = []
    for kernel_name, kernel in kernels.items():
        for called in called_names(kernel):
            target = kernel.fn.__globals__.get(called)
            if inspect.isfunction(target) and not isinstance(target, KERNEL_TYPES):
                plain.append(f"{kernel_name} calls {called}")
    assert not plain, f"{name}: plain Python helpers called from kernels: {plain}"


# The prefill kernel compiled for GPUs (no GPU needed: triton's own ptxas) in the variants the
# launcher makes, head dims split into two parts (`head_dim_split`) or padded: the compiler
# checks what the interpreter does not (a loop-carried value keeping its shape and dtype,
# tl.arange sizes, tl.dot's >= 16 dims), and the dots do the work of the head's columns.
# (arch, head_dim, paged, mask, softcap, ranges, fp8 kv, longest query run)
PREFILL_VARIANTS = [
    (90, 80, False, 3, False, False, False, 42_000),  # Qwen2.5-VL tower full attention
    (90, 80, False, 3, False, False, False, 64),  # its windows
    (80, 80, False, 3, False, False, False, 4784),  # A100's mma.sync
    (90, 72, True, 1, True, False, False, 512),  # sliding + soft-cap, 8 columns masked
    (90, 96, True, 0, False, True, False, 2048),  # media ranges
    (90, 48, True, 2, False, False, False, 512),  # chunked
    (90, 80, True, 4, False, True, False, 300),  # cross
    (90, 192, True, 0, False, False, True, 4096),  # MLA's q/k, FP8 cache
    (90, 128, True, 0, False, False, False, 38_000),  # one part, as before the split
]


def compile_prefill(arch, head_dim, paged, mask, softcap, ranges, fp8, max_q) -> list[tuple]:
    """Compile `_attn_fwd_kernel` for sm_`arch` as `_launch` would launch it (bf16 q); its TTIR
    dots as (M, K, N). Run with TRITON_INTERPRET unset."""
    import re

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from polymodal.llm_core.attention import triton_prefill as prefill

    block_m, block_n, num_warps, num_stages = prefill.prefill_config(head_dim, True, max_q)
    block_d, d_lo = prefill.head_dim_split(head_dim)
    # SPLITS 1: the one-pass form (a split launch is a causal chunk of <= 64 queries)
    const = dict(GROUP=4, HEAD_DIM=head_dim, PAGE_SIZE=16 if paged else 1, BLOCK_M=block_m,
                 BLOCK_N=block_n, BLOCK_D=block_d, PAGED=paged, MASK=mask, SOFTCAP=softcap,
                 DOT_F32=False, USE_PDL=arch >= 90, RANGES=ranges, FP8_KV=fp8,
                 D_LO=d_lo, SPLITS=1, MIN_TILES=1, PACK=False, Q_ROWS=0)  # fmt: skip
    kv = "*fp8e4nv" if fp8 else "*bf16"
    fn = prefill._attn_fwd_kernel
    types = {
        name: "constexpr" if name in const
        else "*bf16" if name in ("q_ptr", "out_ptr")
        else kv if name in ("k_ptr", "v_ptr")
        else "*i32" if name.endswith("_ptr")
        else "fp32" if name in ("qk_scale", "cap_log2", "v_scale")
        else "i32"
        for name in fn.arg_names
    }  # fmt: skip
    kernel = triton.compile(
        ASTSource(fn, types, const),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    dot = r"tt\.dot [^:\n]*: tensor<(\d+)x(\d+)x\w+> \* tensor<\d+x(\d+)x\w+>"
    return [tuple(map(int, m)) for m in re.findall(dot, kernel.asm["ttir"])]


def test_prefill_kernel_compiles_for_gpus():
    """Each variant compiles to a cubin; its dots (QK^T and PV in each key loop: unmasked and
    masked tiles, masked only where the mask is windowed or has ranges) multiply-add
    `BLOCK_M * BLOCK_N * (BLOCK_D + D_LO)` each, i.e. 80 columns for d 80, not 128."""
    import json
    import os
    import subprocess
    import sys

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json; from tests.llm_core.test_kernel_helpers_jit import PREFILL_VARIANTS as V,"
        " compile_prefill; print(json.dumps([compile_prefill(*v) for v in V]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-6000:]
    from polymodal.llm_core.attention.triton_prefill import head_dim_split, prefill_config

    for variant, dots in zip(PREFILL_VARIANTS, json.loads(done.stdout.splitlines()[-1])):
        _, head_dim, _, mask, _, ranges, _, max_q = variant
        block_m, block_n, *_ = prefill_config(head_dim, True, max_q)
        width = sum(head_dim_split(head_dim))
        loops = 1 if mask in (1, 2) or ranges else 2
        macs = sum(m * k * n for m, k, n in dots)
        assert macs == loops * 2 * block_m * block_n * width, variant
        assert width < 2 * head_dim and width >= head_dim, variant


# The one-launch MoE block compiled for sm_90 as `moe_layer` launches it: (name, constexprs,
# warps); each loop-carried value must keep its shape across the persistent loops (a check the
# interpreter does not make).
MOE_LAYER_VARIANTS = [
    ("qwen3", dict(NORM=True, RESIDUAL=True, SIGMOID=False, FP32_LOGITS=False, BIAS=False,
                   TOP_K=8, NUM_SHARED=0, SLOTS=8, NUM_GROUPS=1, TOPK_GROUPS=1, BLOCK_J=8,
                   BLOCK_E=128, BLOCK_G=1, BLOCK_S=128, BLOCK_R=1, BLOCK_KR=2048, BLOCK_NG=32,
                   BLOCK_KG=512, BLOCK_ND=32, BLOCK_KD=256, PREFETCH=True), 8),
    ("deepseek", dict(NORM=True, RESIDUAL=True, SIGMOID=True, FP32_LOGITS=True, BIAS=True,
                      TOP_K=8, NUM_SHARED=1, SLOTS=9, NUM_GROUPS=8, TOPK_GROUPS=4, BLOCK_J=16,
                      BLOCK_E=256, BLOCK_G=8, BLOCK_S=32, BLOCK_R=2, BLOCK_KR=4096, BLOCK_NG=16,
                      BLOCK_KG=512, BLOCK_ND=16, BLOCK_KD=256, PREFETCH=False), 4),
]  # fmt: skip


def compile_moe_layer(name: str) -> bool:
    """Compile `_moe_layer_kernel` for sm_90 in variant `name` (bf16, one row); whether a cubin
    came out. Run with TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from polymodal.llm_core.layers import moe_layer

    variant, warps = next((const, warps) for n, const, warps in MOE_LAYER_VARIANTS if n == name)
    const = dict(variant, RENORMALIZE=True, BLOCK_P=8, BLOCK_M=1, BLOCK_PAIRS=16,
                 WEIGHT_EVICTION="evict_first", USE_PDL=True)  # fmt: skip
    fn = moe_layer._moe_layer_kernel
    fp32 = ("bias_ptr", "logits_ptr", "weights_ptr", "part_ptr", "sumsq_ptr", "norm_sumsq_ptr")
    types = {
        arg: "constexpr" if arg in const
        else "*fp32" if arg in fp32
        else "*i32" if arg in ("ids_ptr", "counter_ptr")
        else "*bf16" if arg.endswith("_ptr")
        else "fp32" if arg in ("eps", "scaling")
        else "i32"
        for arg in fn.arg_names
    }  # fmt: skip
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
               if arg.endswith("_ptr") or arg in ("E", "H", "I", "stride_xm")}  # fmt: skip
    kernel = triton.compile(
        ASTSource(fn, types, const, aligned),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, "num_stages": 1},
    )
    return len(kernel.asm["cubin"]) > 0


def test_moe_layer_kernel_compiles_for_gpus():
    import os
    import subprocess
    import sys

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    names = [name for name, _, _ in MOE_LAYER_VARIANTS]
    code = (
        "from tests.llm_core.test_kernel_helpers_jit import compile_moe_layer as c;"
        f" print([c(n) for n in {names!r}])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert done.stdout.splitlines()[-1] == str([True] * len(names))
