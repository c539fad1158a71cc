"""The bench's decode floors: every decoder weight once (`decoder_bytes`), and for MoE models
only the experts the step's tokens choose (`active_decoder_bytes`), on the shipped configs
built on the meta device (no weights, no GPU)."""

import pytest
import torch

from polymodal.bench import BUILTIN
from polymodal.bench.workloads import active_decoder_bytes, decoder_bytes
from polymodal.llm_core.attention import get_backend
from polymodal.llm_core.config import load_config
from polymodal.llm_core.registry import encoder_class, model_class


def _meta_model(name):
    cfg = load_config(BUILTIN[name], "bfloat16")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            tower = encoder_class(cfg.architecture)
            extra = {"tower": tower} if tower is not None else {}
            return model_class(cfg.architecture)(cfg, get_backend("torch"), 16, **extra)
    finally:
        torch.set_default_dtype(default)


@pytest.mark.parametrize(
    # parameters one token reads: the published "active" counts less the embedding table (a
    # step reads one row of it); the reduced DeepSeek-V3 by hand (3 MLA layers, 1 dense MLP,
    # 2 x (8 experts + the shared one + the router), the head)
    "name, active_params",
    [
        ("qwen3-30b-a3b", 3.35e9 - 0.31e9),
        ("mixtral-8x7b", 12.9e9 - 0.13e9),
        ("deepseek-v3-reduced", 2.68e9),
        # 8 Scout layers (attention 62.9M, shared expert + one expert 2 x 125.8M, router) and
        # the head (1.03B); the tower is not part of a decode step
        ("llama4-scout-reduced", 8 * 314.66e6 + 1.0345e9),
    ],  # fmt: skip
)
def test_one_token_reads_top_k_experts_a_layer(name, active_params):
    model = _meta_model(name)
    dense = decoder_bytes(model)
    active = active_decoder_bytes(model, 1)
    assert abs(active / 2 - active_params) / active_params < 0.05, active / 2
    assert active < dense
    many = active_decoder_bytes(model, 10_000)  # every expert chosen: all weights again
    assert abs(many - dense) / dense < 1e-6


def test_dense_model_floor_is_unchanged():
    model = _meta_model("gemma-3-12b")
    assert active_decoder_bytes(model, 1) == decoder_bytes(model)


def test_caption_floor_counts_decoder_and_head_once_per_output_token():
    """Qwen2.5-VL-7B: 6.53B decoder-layer weights (28 x 233M) + the 0.545B LM head (untied;
    the embedding table is a lookup), 2 FLOPs each per output token; attention over the
    context on top, linear in it."""
    from polymodal.bench.media_caption import output_flops

    model = _meta_model("qwen2.5-vl-7b")
    per_token = output_flops(model, 0, 1)
    assert abs(per_token / 2 - (6.53e9 + 0.545e9)) / 7.07e9 < 0.01, per_token / 2
    attn = 4 * 28 * 28 * 128  # layers x heads x head_dim, two products, per context token
    assert output_flops(model, 1000, 1) - per_token == attn * 1000
    assert output_flops(model, 0, 10) > 10 * per_token  # each step sees a longer context


def test_media_table_shows_each_inputs_host_share(capsys):
    """`polymodal bench --workload media`'s table: TTFT, the host's share of it, the repeat,
    the floor; a refused input is a row with its error, not a crash of the table."""
    from polymodal.bench.media import print_table

    rows = {
        "4k": {"prompt_tokens": 10583, "first_ttft_ms": 504.1, "ttft_ms": 459.4, "host_ms": 8.6,
               "repeat_ttft_ms": 12.3, "floor_ms": 320.6, "fraction_of_floor": 320.6 / 459.4},
        "video256": {"error": "InvalidInputError: the prompt has 153122 tokens"},
    }  # fmt: skip
    print_table({"card": "NVIDIA H200", "date": "2026-12-05", "model": "qwen2.5-vl-7b",
                 "matmul_tflops": 805.0, "inputs": rows})  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert "host ms" in out[1]
    assert out[2].split()[:8] == ["4k", "10583", "504.1", "459.4", "8.6", "12.3", "320.6", "70%"]
    assert out[3].startswith("video256   refused: InvalidInputError")
