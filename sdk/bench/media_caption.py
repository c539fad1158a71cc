"""The media workload's captioning row (issue 15: "captioning 1080p images >= 65% of the
compute-floor rate, GPU idle < 5%"): N distinct photo-like 1920x1080 images through the engine
as `polymodal caption` drives it (`OurSide.caption`: processing on a thread pool, staged ahead),
`--output-tokens` forced tokens each, against the rate the compute floor allows.

The floor of one image is its prefill (`media.input_flops`: tower, decoder GEMMs, causal
attention) plus each output token's 2 FLOPs a decoder and LM-head weight and its attention over
the context, all at the bf16 matrix rate measured in the same run. Decode steps of a full batch
are bound by the same matrix rate (the weights are read once a step for many sequences), so the
floor is an upper bound on images/s. GPU idle is measured on a smaller, profiled run (the
profiler slows the host a little: the share is an upper bound too), with the step phases as
profiler ranges (`engine_ranges`) and the host work inside the largest gap pairs (`gap_hosts`).
"""

from __future__ import annotations

from polymodal.bench.media import IMAGES, input_flops, photo
from polymodal.bench.profile import calls_profile, engine_ranges
from polymodal.bench.trace import print_gap_hosts
from polymodal.bench.workloads import TEXT_TOKENS, OurSide, text_ids
from polymodal.processors.chat import MediaRef

SIZE = IMAGES["1080p"]
PROFILED_IMAGES = 16


def output_flops(model, context: int, tokens: int) -> float:
    """FLOPs of `tokens` decode steps of one sequence from `context` tokens: 2 per decoder and
    LM-head weight, and attention's two products over the growing context."""
    cfg = model.config
    layers = model.model.layers
    params = sum(p.numel() for p in layers.parameters()) + model.lm_head.weight.numel()
    mean_context = context + tokens / 2
    attn = 4 * len(layers) * cfg.num_heads * cfg.head_dim * mean_context
    return tokens * (2 * params + attn)


def image_floor_ms(ours: OurSide, image, output_tokens: int, rate: float) -> tuple[float, int]:
    """(floor ms, prompt tokens) of captioning `image` with `output_tokens` at `rate` TFLOP/s."""
    ids = ours.image_prefix + text_ids(TEXT_TOKENS, 0, ours.vocab)
    prompt = ours.processor.process_tokens(ids, [MediaRef("image", image)])
    tokens, grid = len(prompt.token_ids), prompt.mm_items[0].data["grid_thw"]
    flops = input_flops(ours.model, grid, tokens) + output_flops(ours.model, tokens, output_tokens)
    return flops / (rate * 1e12) * 1e3, tokens


def caption_1080p(ours: OurSide, count: int, output_tokens: int, rate: float) -> dict:
    """Captioning rate of `count` fresh 1080p images vs the floor's, and the GPU idle share of
    a profiled run of `PROFILED_IMAGES` more."""
    ours.caption([photo(SIZE, 300 + i) for i in range(4)], 4)  # the size's first sight
    pics = [photo(SIZE, 500 + i) for i in range(count)]
    floor_ms, tokens = image_floor_ms(ours, pics[0], output_tokens, rate)
    out = ours.caption(pics, output_tokens)
    out.update(prompt_tokens=tokens, output_tokens=output_tokens, floor_images_s=1e3 / floor_ms)
    out["fraction_of_floor"] = out["images_s"] / out["floor_images_s"]
    more = [photo(SIZE, 900 + i) for i in range(PROFILED_IMAGES)]
    run = lambda: ours.caption(more, output_tokens)  # noqa: E731
    prof = calls_profile(run, 1, engine_ranges(ours.engine), host_pairs=4)
    out["profiled_gpu_idle_share"] = prof["gpu_idle_share"]
    out["profiled_idle_gaps"] = prof["idle_gaps"][:4]
    out["profiled_gap_hosts"] = prof["gap_hosts"]
    return out


def print_row(row: dict) -> None:
    print(f"captioning 1080p: {row['caption_images']} images x {row['output_tokens']} tokens "
          f"({row['prompt_tokens']} prompt tokens each): {row['images_s']:.2f} images/s, "
          f"floor {row['floor_images_s']:.2f} -> {row['fraction_of_floor']:.0%} of the floor "
          f"rate; GPU idle {row['profiled_gpu_idle_share']:.1%} ({PROFILED_IMAGES} images "
          "profiled)")  # fmt: skip
    if row.get("profiled_gap_hosts"):
        print("  idle gaps and what the engine thread ran meanwhile (self time, profiled run):")
        print_gap_hosts(row["profiled_gap_hosts"])
