"""The attention kernels' step metadata (query starts, lengths, block tables, cross ranges,
slots) does not select a kernel variant by its alignment: an eager step's are views at any int32
offset of one upload (`cross_inputs.cross_metas`), a captured graph's whole buffers, and each
alignment compiled a variant of its own inside a step (1-1.4 s on an H100, Mllama's first eager
mixed steps). Triton's sm_90 argument specialization is computed offline in a subprocess (the
tests' TRITON_INTERPRET off); a misaligned q pointer still changes it, so the check can fail."""

import json
import os
import subprocess
import sys

import pytest
import triton

SCRIPT = r"""
import inspect, json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from polymodal.llm_core.attention import spec, triton_decode, triton_prefill

backend = make_backend(GPUTarget("cuda", 90, 32))
FLOATS = {"qk_scale", "cap_log2", "norm_eps", "k_scale", "v_scale"}
out = {}
for kernel, names in ((triton_prefill._attn_fwd_kernel, spec.PREFILL_METADATA),
                      (triton_decode._decode_kernel, spec.DECODE_METADATA)):
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    buf = torch.zeros(64, dtype=torch.int32)

    def key(misaligned):
        args = []
        for p in kernel.params:
            if p.is_constexpr:
                args.append(1 if p.default is inspect.Parameter.empty else p.default)
            elif p.name.endswith("_ptr"):  # 4 bytes past a 16-byte boundary, or on one
                args.append(buf[1:] if p.name in misaligned else buf[4:])
            else:
                args.append(1.5 if p.name in FLOATS else 32)
        return repr(binder(*args)[1])

    out[kernel.fn.__name__] = {"aligned": key(()), "metadata": key(names), "q": key(("q_ptr",))}
json.dump(out, sys.stdout)
"""


def test_metadata_alignment_selects_no_kernel_variant():
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    keys = json.loads(done.stdout)
    assert sorted(keys) == ["_attn_fwd_kernel", "_decode_kernel"]
    for name, key in keys.items():
        assert key["metadata"] == key["aligned"], name
        assert key["q"] != key["aligned"], name  # the data pointers keep their alignment hint
