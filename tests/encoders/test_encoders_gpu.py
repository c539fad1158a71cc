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
