"""`Linear`'s opt-in GEMV routing (`EngineConfig.decode_gemv`): which calls take it, which
models get it, and on CUDA the engine's logits with it against cuBLAS."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm_core.engine import Engine
from polymodal.llm_core.layers.linear import GEMV_MAX_ROWS, Linear, PackedLinear, enable_gemv
from polymodal.llm_core.sampling_params import SamplingParams
from tests.helpers import record_logits, tiny_checkpoint


def test_linear_routes_few_rows_to_gemv_only_when_set():
    layer = Linear(16, 8, bias=True)
    x = torch.randn(max(9, GEMV_MAX_ROWS + 1), 16)
    assert torch.equal(layer(x[:2]), F.linear(x[:2], layer.weight, layer.bias))  # default
    calls = []

    def fake_gemv(rows, weight, bias, silu_mul=False, residual=None):
        calls.append(rows.shape[0])
        return F.linear(rows, weight, bias) + 1

    layer.gemv = fake_gemv
    small = x[:GEMV_MAX_ROWS]
    assert torch.equal(layer(small), F.linear(small, layer.weight, layer.bias) + 1)
    too_many = x[: GEMV_MAX_ROWS + 1]
    assert torch.equal(layer(too_many), F.linear(too_many, layer.weight, layer.bias))
    assert torch.equal(
        layer(x[:9].view(3, 3, 16)), F.linear(x[:9].view(3, 3, 16), layer.weight, layer.bias)
    )
    assert calls == [GEMV_MAX_ROWS]


def test_fused_work_only_where_the_call_site_asks_for_it():
    """`forward` is the plain product even where a GEMV could fold an add; `fused` asks for
    SiLU*mul on load and the residual add, which the GEMV folds and other paths leave to the
    caller (plain output back)."""
    from polymodal.llm_core.layers.activation import silu_and_mul
    from polymodal.llm_core.layers.norm import AddedResidual

    layer = Linear(8, 6, bias=False)
    x, residual = torch.randn(1, 16), torch.randn(1, 6)
    gate_up = x
    expected = F.linear(silu_and_mul(gate_up), layer.weight)
    assert torch.equal(layer.fused(gate_up, residual=residual, silu_mul=True), expected)
    seen = []

    def fake_gemv(rows, weight, bias, silu_mul=False, residual=None):
        seen.append((silu_mul, residual is not None))
        out = F.linear(silu_and_mul(rows) if silu_mul else rows, weight, bias)
        return out if residual is None else AddedResidual(out + residual, out.new_zeros(1, 1))

    layer.gemv = fake_gemv
    assert torch.equal(layer(x[:, :8]), F.linear(x[:, :8], layer.weight))
    added = layer.fused(gate_up, residual=residual, silu_mul=True)
    assert isinstance(added, AddedResidual) and torch.equal(added.h, expected + residual)
    assert seen == [(False, False), (True, True)]


def test_a_linear_method_plugs_in():
    """The `LinearMethod` seam: a method owns the weights and the product; `enable_gemv` leaves
    a method that does not support the GEMV alone."""
    from polymodal.llm_core.layers.linear import LinearMethod

    class Int8Rows(LinearMethod):  # a toy weight-only quantization: int8 rows + fp32 scales
        def create_weights(self, layer, dtype=None, device=None):
            shape = (layer.out_features, layer.in_features)
            layer.qweight = nn.Parameter(torch.zeros(shape, dtype=torch.int8), False)
            layer.scale = nn.Parameter(torch.ones(layer.out_features))
            layer.weight, layer.bias = layer.qweight, None

        def apply(self, layer, x, silu_mul=False, residual=None):
            return F.linear(x, layer.qweight.float() * layer.scale[:, None])

    layer = Linear(4, 3, bias=False, method=Int8Rows())
    layer.qweight.data = torch.tensor([[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, -3]], dtype=torch.int8)
    layer.scale.data = torch.tensor([0.5, 1.0, 2.0])
    assert layer(torch.ones(1, 4)).tolist() == [[0.5, 2.0, -6.0]]
    assert not layer.method.supports_gemv and not layer.uses_gemv(torch.ones(1, 4))


def test_enable_gemv_skips_cpu_weights():
    model = nn.Sequential(Linear(4, 4), PackedLinear(4, {"a": 2, "b": 3}, bias=False))
    model.to(torch.bfloat16)
    assert enable_gemv(model) == 0
    assert all(m.gemv is None for m in model if isinstance(m, Linear))


def test_engine_decode_gemv_is_a_no_op_on_cpu(tmp_path_factory):
    """Every decoder projection and the LM head are `Linear`s; on CPU none gets the GEMV."""
    path = tiny_checkpoint(tmp_path_factory, "qwen2")
    engine = Engine(str(path), dtype="bfloat16", device="cpu", decode_gemv=True)
    model = engine.runner.model
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert plain == []
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.config.num_layers + 1
    assert all(m.gemv is None for m in linears)


@pytest.mark.gpu
def test_decode_gemv_engine_matches_cublas_on_cuda(tmp_path_factory):
    """bf16, one request: its decode steps (one row: graphs captured with the GEMV, LM head
    included) give the cuBLAS engine's logits, compared while the greedy tokens agree (a bf16
    near-tie may flip one; the histories differ after that)."""
    path = tiny_checkpoint(tmp_path_factory, "qwen2")  # q/k/v bias
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 17, 42, 99]]
    runs = {}
    for gemv in (True, False):
        engine = Engine(str(path), dtype="bfloat16", device="cuda", decode_gemv=gemv)
        model = engine.runner.model
        assert all((m.gemv is not None) == gemv for m in model.modules() if isinstance(m, Linear))
        assert engine.runner.graphs is not None
        seen = record_logits(engine)
        ids = [engine.add_request(p, params) for p in prompts]
        final = engine.run_until_done()
        runs[gemv] = (seen, [final[i].outputs[0].token_ids for i in ids])
    (fast, fast_tokens), (ref, ref_tokens) = runs[True], runs[False]
    assert min(len(fast), len(ref)) >= 8 and fast[0].shape == (1, model.config.vocab_size)
    for step in range(8):  # step 0: prefill; logits of step s chose tokens[:, s]
        torch.testing.assert_close(fast[step], ref[step], atol=5e-2, rtol=0, msg=f"step {step}")
        if [t[step] for t in fast_tokens] != [t[step] for t in ref_tokens]:
            break
