"""The residual add + LayerNorm kernel (`layers/triton_norm.py`) compiled on CUDA at
BERT-base's width, against eager torch; and a BERT-base layer built from it against
transformers' `BertLayer` in bf16 (on the CPU: test_triton_layer_norm.py, test_pooling.py)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted here"
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm_on_cuda(dtype):
    """A step's rows of width 768 (a masked 1024 block): eager torch's add + LayerNorm up to
    fp32 rounding of the statistics (at most one bf16 step in bf16), with and without the
    residual; `LayerNorm(x, residual)` takes the kernel on CUDA."""
    from polymodal.llm_core.layers import triton_norm as kernels
    from polymodal.llm_core.layers.norm import LayerNorm

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (3 * torch.randn(4096, 768, device="cuda", generator=gen) + 1).to(dtype)
    residual = torch.randn(4096, 768, device="cuda", generator=gen).to(dtype)
    norm = LayerNorm(768, eps=1e-12).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
        norm.bias.normal_(generator=gen)
    for res in (residual, None):
        out = kernels.add_layer_norm(x, res, norm.weight, norm.bias, norm.eps, False)[1]
        ref = kernels.add_layer_norm_ref(x, res, norm.weight, norm.bias, norm.eps)[1]
        if dtype == torch.float32:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        else:  # one bf16 rounding step (8 bits of mantissa) of the larger term of
            # `normalized * w + b`: where the two cancel, fp32 statistics rounded differently
            # move the output by that much (a relative bound fails there)
            h = (x if res is None else x + res).float()
            normalized = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True)
                                                          + norm.eps).sqrt()  # fmt: skip
            step = ((normalized * norm.weight.float()).abs() + norm.bias.float().abs()) / 128
            assert ((out.float() - ref.float()).abs() <= step + 1e-6).all()
        assert torch.equal(norm(x, res), out)


def test_bert_base_layer_matches_transformers_in_bf16(tmp_path):
    """A BERT-base sequence classifier (random weights, bf16) through the engine on CUDA: the
    fused LayerNorms in every layer keep the probabilities within 2e-2 of transformers' in
    bf16 and the fp32 logits within 1e-3."""
    import transformers as tf

    from polymodal.llm_core.engine import Engine
    from polymodal.llm_core.pooling import PoolingParams

    config = tf.BertConfig(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                           intermediate_size=3072, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path)
    prompts = torch.randint(1000, config.vocab_size, (8, 128)).tolist() + [[101, 7, 9, 102]]
    for dtype, params, tol in (("bfloat16", PoolingParams(), 2e-2),
                               ("float32", PoolingParams(task="encode"), 1e-3)):  # fmt: skip
        torch_dtype = getattr(torch, dtype)
        hf = tf.BertForSequenceClassification.from_pretrained(tmp_path, dtype=torch_dtype)
        hf = hf.to("cuda").eval()
        engine = Engine(str(tmp_path), dtype=dtype, device="cuda")
        ids = engine.add_requests(prompts, params)
        final = engine.run_until_done()
        for i, prompt in zip(ids, prompts):
            with torch.no_grad():
                logits = hf(torch.tensor([prompt], device="cuda")).logits[0].float()
            ref = logits.softmax(-1) if params.task != "encode" else logits
            got = final[i].outputs.data.float().to("cuda")
            assert (got - ref).abs().max() <= tol, (dtype, len(prompt))
