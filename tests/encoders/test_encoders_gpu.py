"""Vision towers on CUDA: same result as on the CPU (fp32), close in bf16."""

import pytest
import torch

from polymodal.encoders import load_encoder
from polymodal.llm_core.attention import get_backend

GRID = [[1, 10, 14], [2, 4, 6], [1, 6, 4]]


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["torch", "triton"])
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_cuda_matches_cpu(arch, backend_name, vl_checkpoint, random_pixels):
    pixel_values, grid_thw = random_pixels(GRID)
    backend = get_backend(backend_name, "cuda")
    with torch.inference_mode():
        ref = load_encoder(vl_checkpoint(arch))(pixel_values, grid_thw)
        fp32 = load_encoder(vl_checkpoint(arch), device="cuda", backend=backend)
        torch.backends.cuda.matmul.allow_tf32 = False
        out = fp32(pixel_values.cuda(), grid_thw)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=0)
        bf16 = load_encoder(vl_checkpoint(arch), torch.bfloat16, "cuda", backend)
        out = bf16(pixel_values.cuda(), grid_thw)
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert (out.float().cpu() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_new_layout_never_waits_for_the_device(arch, vl_checkpoint, random_pixels):
    """A grid list the tower has not seen builds its layout on the host and copies it
    asynchronously: a wait there would stall the engine behind all queued GPU work."""
    tower = load_encoder(vl_checkpoint(arch), torch.bfloat16, "cuda", get_backend("triton", "cuda"))
    pixel_values, grid_thw = random_pixels(GRID)
    pixel_values = pixel_values.cuda()
    with torch.inference_mode():
        expected = tower(pixel_values, grid_thw)
        if hasattr(tower, "_layouts"):
            tower._layouts.clear()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = tower(pixel_values, grid_thw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def _peak_above_start(run):
    """`run()`'s result and the most device memory it held at once beyond what was allocated
    before it (its activations)."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - start


@pytest.mark.gpu
def test_long_video_in_temporal_pieces_matches_one_shot_in_bounded_memory():
    """Qwen2.5-VL-7B's tower (random weights, fp32) on a 64-frame 448x448 video (32 temporal
    patches, 32768 patches): encoded 4 temporal patches at a time (what the engine's
    `split_media` does under a 1024-row budget) it gives the one-shot rows, and the pieces'
    peak memory is the same for 16 or 32 temporal patches, far below the one-shot call's."""
    import json

    from polymodal.bench import BUILTIN
    from polymodal.encoders.qwen2_5_vl import Qwen2_5VisionTower
    from polymodal.llm_core.weights import run_post_load_hooks

    vision = json.loads((BUILTIN["qwen2.5-vl-7b"] / "config.json").read_text())["vision_config"]
    backend = get_backend("triton", "cuda")
    tower = Qwen2_5VisionTower.from_config(vision, torch.float32, "cuda", backend)
    gen = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0 if "norm" in name or "ln_q" in name else 0.0)
    run_post_load_hooks(tower)  # as after loading: the fused, padded MLP weights
    torch.backends.cuda.matmul.allow_tf32 = False
    t, h, w, per_piece = 32, 32, 32, 4
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, device="cuda", generator=gen)

    def in_pieces(frames: int) -> torch.Tensor:
        out = torch.empty(frames * h * w // 4, 3584, device="cuda")
        for first in range(0, frames, per_piece):
            rows = slice(first * h * w // 4, (first + per_piece) * h * w // 4)
            piece = pixels[first * h * w : (first + per_piece) * h * w]
            out[rows] = tower(piece, torch.tensor([[per_piece, h, w]]))
        return out

    with torch.inference_mode():
        one_shot, one_shot_peak = _peak_above_start(
            lambda: tower(pixels, torch.tensor([[t, h, w]]))
        )
        in_pieces(per_piece)  # warm-up: kernels compiled, layouts cached
        _, half_peak = _peak_above_start(lambda: in_pieces(t // 2))
        pieces, peak = _peak_above_start(lambda: in_pieces(t))
    scale = one_shot.abs().max().item()
    assert (pieces - one_shot).abs().max().item() <= 1e-4 * scale
    out_bytes = (t // 2) * h * w // 4 * 3584 * 4  # the longer video's extra output rows
    assert peak - half_peak <= out_bytes + (16 << 20)
    assert peak - out_bytes * 2 < one_shot_peak / 4
