"""CUDA graphs for small, repeated vision-tower calls (latency: one image = hundreds of launches).

A tower opts in with `supports_cuda_graphs = True`: its forward must read `grid_thw` on the
host only and take every grid-derived tensor from a cache (so a replay launches no host->device
copies). A layout (the list of grids) is captured the second time it is seen; the output is
cloned after each replay because the encoder cache keeps it beyond the next call. A tower of
fixed-size images (`[N, C, S, S]` pixels, no grid: Gemma 3's SigLIP) is keyed by its input's
shape; its forward must make no host->device copy either.
Capture mode is thread-local: media staging threads may use the device meanwhile.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch


class EncoderGraphs:
    """Replays captured graphs of `tower` for batches of at most `max_items` media items and
    `max_patches` patches. Larger calls run eager: launches matter little there, and a graph
    would keep its activations in its private memory pool for good (the pieces of a long
    video repeat one layout, which would otherwise be captured)."""

    def __init__(
        self,
        tower,
        max_items: int = 4,
        max_graphs: int = 8,
        max_patches: int = 16384,
        max_pixels: int = 4 * 896 * 896,
    ):
        self.tower = tower
        self.max_items = max_items
        self.max_patches = max_patches
        self.max_pixels = max_pixels  # no-grid calls: 4 Gemma 3 crops, 28 CLIP 336 px views
        self.max_graphs = max_graphs
        self.seen: Counter = Counter()
        # layout key -> (graph, static pixel_values, static output)
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None):
        """Same contract as the tower's forward; `grid_thw` must be a CPU tensor. Without one,
        `pixel_values` is a batch of `[N, C, S, S]` fixed-size images, replayed up to
        `max_pixels` pixels in all."""
        args = (pixel_values,) if grid_thw is None else (pixel_values, grid_thw)
        if grid_thw is None:
            key = (tuple(pixel_values.shape), pixel_values.dtype)
            small = pixel_values[:, 0].numel() <= self.max_pixels
        else:
            key = (tuple(map(tuple, grid_thw.tolist())), pixel_values.dtype)
            small = len(key[0]) <= self.max_items and pixel_values.shape[0] <= self.max_patches
        if not pixel_values.is_cuda or not small:
            return self.tower(*args)
        if key not in self.graphs:
            self.seen[key] += 1
            if self.seen[key] < 2:
                return self.tower(*args)
            self._capture(key, args)
        self.graphs.move_to_end(key)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(pixel_values)
        graph.replay()
        return static_out.clone()

    def _capture(self, key: tuple, args: tuple) -> None:
        static_in = args[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.tower(static_in, *args[1:])  # warm-up: layout cached, kernels compiled
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                static_out = self.tower(static_in, *args[1:])
        torch.cuda.current_stream().wait_stream(stream)
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        self.graphs[key] = (graph, static_in, static_out)
