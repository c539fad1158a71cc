"""The MoE decode routing's L2 prefetch of the next layer's first weight (`l2_prefetch.py`):
which weight each block asks for, how many bytes, that the sm_90 kernel issues one bulk
prefetch after its PDL wait (compiled offline), and on a GPU that it changes no result."""

import os
import subprocess
import sys

import pytest
import torch
import triton

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.layers import l2_prefetch, moe_route
from polymodal.llm_core.layers.moe import SparseMoeBlock, _next_linear
from tests.helpers import tiny_checkpoint


def test_each_block_prefetches_the_next_layers_first_projection(tmp_path_factory):
    """Qwen3-MoE (layer 1 dense): a sparse block's next `Linear` outside it is the next layer's
    qkv, also after a dense layer's MLP; the last block's is the LM head."""
    path = tiny_checkpoint(tmp_path_factory, "qwen3_moe")
    model = Engine(str(path), dtype="float32", device="cpu").runner.model
    layers = model.model.layers
    named = list(model.named_modules())
    sparse = [i for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert sparse == [0, 2, 3]
    for i in sparse[:-1]:
        assert _next_linear(named, layers[i].mlp) == (layers[i + 1].self_attn.qkv_proj,)
    assert _next_linear(named, layers[-1].mlp) == (model.lm_head,)


def test_prefetch_size_is_the_first_bytes_up_to_the_cap(monkeypatch):
    weight = torch.empty(5120, 2048, dtype=torch.bfloat16)  # Qwen3-30B-A3B's qkv: 21 MB
    assert moe_route.prefetch_size(weight) == 0  # no CUDA here
    monkeypatch.setattr(moe_route, "prefetchable", lambda t: t is not None)
    monkeypatch.setattr(moe_route, "supported", lambda device: True)
    monkeypatch.setattr(moe_route, "L2_PREFETCH_BYTES", 16 << 20)
    assert moe_route.prefetch_size(weight) == 16 << 20
    assert moe_route.prefetch_size(weight[:8]) == 8 * 2048 * 2
    assert moe_route.prefetch_size(None) == 0
    monkeypatch.setattr(moe_route, "L2_PREFETCH_BYTES", 1000)
    assert moe_route.prefetch_size(weight) == 992  # a multiple of 16
    monkeypatch.setattr(moe_route, "L2_PREFETCH_BYTES", 0)
    assert moe_route.prefetch_size(weight) == 0


def test_prefetchable_wants_cuda_contiguous_16_byte_multiples():
    assert not l2_prefetch.prefetchable(None)
    assert not l2_prefetch.prefetchable(torch.empty(64, dtype=torch.bfloat16))  # on the CPU
    assert not l2_prefetch.supported(torch.device("cpu"))


SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from polymodal.llm_core.layers import moe_route

fn = moe_route._route_kernel
const = dict(NORM=True, SIGMOID=False, FP32_LOGITS=False, BIAS=False, RENORMALIZE=True, TOP_K=8,
             NUM_SHARED=0, NUM_GROUPS=1, TOPK_GROUPS=1, BLOCK_J=8, BLOCK_E=128, BLOCK_G=1,
             BLOCK_S=128, BLOCK_P=1, BLOCK_M=1, BLOCK_N=1, BLOCK_K=2048,
             WEIGHT_EVICTION="evict_first", USE_PDL=True, PREFETCH=sys.argv[1] == "1",
             EVICT_LAST=sys.argv[2] == "1")
bf16 = ("x_ptr", "w_ptr", "norm_w_ptr", "prefetch_ptr")
ints = ("counter_ptr", "ids_ptr")
types = {n: "constexpr" if n in const else "*bf16" if n in bf16 else "*i32" if n in ints
         else "*fp32" if n.endswith("_ptr") else "fp32" if n in ("eps", "scaling") else "i32"
         for n in fn.arg_names}
kernel = triton.compile(ASTSource(fn, types, const), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 1})
print(json.dumps(kernel.asm["ptx"]))
"""


def _route_ptx(prefetch: bool, evict_last: bool = False) -> str:
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    flags = [str(int(prefetch)), str(int(evict_last))]
    done = subprocess.run([sys.executable, "-c", SCRIPT, *flags], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_routing_issues_one_bulk_prefetch_after_its_pdl_wait():
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no CUDA backend")
    ptx = _route_ptx(True)
    assert ptx.count("cp.async.bulk.prefetch.L2.global") == 1
    assert ptx.index("griddepcontrol.wait") < ptx.index("cp.async.bulk.prefetch.L2.global")
    assert "cp.async.bulk.prefetch" not in _route_ptx(False)
    assert "prefetch.L2.global [" in ptx  # no cache hint: L2's normal priority
    hinted = _route_ptx(True, evict_last=True)
    assert hinted.count("cp.async.bulk.prefetch.L2.global.L2::cache_hint") == 1
    assert "createpolicy.fractional.L2::evict_last" in hinted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 2])
def test_routing_with_a_prefetch_changes_no_result(rows, monkeypatch):
    """Qwen3-30B-A3B's router with the next qkv weight (21 MB, more than the cap) or one of its
    rows asked of L2: the same experts and weights bit for bit, eager and replayed in
    a CUDA graph."""
    from polymodal.llm_core.layers.norm import DeferredNorm

    gen = torch.Generator(device="cuda").manual_seed(rows)
    hidden, experts = 2048, 128
    router = (torch.randn(experts, hidden, device="cuda", generator=gen) / 45).bfloat16()
    h = torch.randn(rows, hidden, device="cuda", generator=gen).bfloat16()
    x = DeferredNorm(h, h.float().square().sum(1, keepdim=True), torch.ones_like(h[0]), 1e-6)
    qkv = torch.randn(5120, hidden, device="cuda", generator=gen).bfloat16()
    plain = moe_route.route(x, router, 8)
    monkeypatch.setattr(moe_route, "L2_PREFETCH_BYTES", 16 << 20)  # (the default may be off)
    for ahead in (qkv, qkv[3:4]):
        if l2_prefetch.supported(qkv.device):
            assert moe_route.prefetch_size(ahead) > 0
        for got, want in zip(moe_route.route(x, router, 8, prefetch=ahead), plain):
            assert torch.equal(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_route.route(x, router, 8, prefetch=qkv)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(got, want) for got, want in zip(captured, plain))
