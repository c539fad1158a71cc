"""Time the Qwen2-VL / Qwen2.5-VL 7B-shaped vision towers (random weights) on one device.

python tests/encoders/bench_vision_towers.py [--device cuda] [--backend torch]
"""

import argparse
import time

import torch

from polymodal.encoders import get_encoder_class
from polymodal.llm_core.attention import get_backend

CONFIGS = {
    "Qwen2VLForConditionalGeneration": dict(
        depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4
    ),
    "Qwen2_5_VLForConditionalGeneration": dict(
        depth=32,
        hidden_size=1280,
        out_hidden_size=3584,
        intermediate_size=3420,
        num_heads=16,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
}
GRIDS = {"one 1008px image": [[1, 72, 72]], "4 images 504x728": [[1, 36, 52]] * 4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    backend = get_backend(args.backend, args.device)
    for arch, config in CONFIGS.items():
        tower = get_encoder_class(arch).from_config(config, dtype, args.device, backend)
        with torch.no_grad():
            for p in tower.parameters():
                p.normal_(0.0, 0.02)
        for name, grid in GRIDS.items():
            grid_thw = torch.tensor(grid)
            pixels = torch.randn(int(grid_thw.prod(-1).sum()), 1176, device=args.device)
            with torch.inference_mode():
                tower(pixels, grid_thw)  # warm-up
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.iters):
                    out = tower(pixels, grid_thw)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
            ms = (time.perf_counter() - start) / args.iters * 1e3
            shape = tuple(out.shape)
            print(f"{arch:36s} {name:18s} {shape} {ms:8.1f} ms ({dtype}, {backend.name})")


if __name__ == "__main__":
    main()
