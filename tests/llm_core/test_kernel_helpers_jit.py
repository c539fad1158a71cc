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
    "polymodal.llm_core.attention.triton_store",
    "polymodal.llm_core.attention.triton_mla",
    "polymodal.llm_core.attention.triton_prefill",
    "polymodal.llm_core.lora.triton_lora",
    "polymodal.llm_core.layers.gemv",
    "polymodal.llm_core.layers.triton_moe",
    "polymodal.llm_core.layers.int4_kernels",
    "polymodal.llm_core.layers.triton_ops",
    "polymodal.llm_core.layers.fp8_kernels",
    "polymodal.llm_core.layers.moe_decode",
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
