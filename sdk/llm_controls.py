"""`LLM`'s calls on the engine itself rather than on prompts (vLLM's names): the prefix cache
reset, weights loaded in place, sleep mode, the model handed to a function, profiler traces,
metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from polymodal.llm_core import profiler, weight_update
from polymodal.llm_core.errors import InvalidInputError


class EngineControls:
    """Mixed into `LLM` (which sets `self.engine`)."""

    engine: Any
    metrics: Any  # metrics_reader.EngineMetrics

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget the cached KV blocks (and encoder outputs); False while requests
        run."""
        return weight_update.reset_prefix_cache(self.engine)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the model's weights in place with `weights` (`(name, tensor)` pairs named as
        in the checkpoint, a complete set; e.g. an RL trainer's new policy), then forget the
        prefix and encoder caches (`llm_core/weight_update.py`)."""
        weight_update.load_weights(self.engine, weights)

    def sleep(self, level: int = 1) -> None:
        """vLLM's: free the GPU memory of an idle engine (`enable_sleep_mode=True`): level 1
        keeps the weights on the host, level 2 drops them (load new ones after `wake_up`)."""
        from polymodal.llm_core import sleep

        sleep.sleep(self.engine, level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM's: take the memory back: `["weights"]`, `["kv_cache"]`, or both (default)."""
        from polymodal.llm_core import sleep

        sleep.wake_up(self.engine, tags)

    def is_sleeping(self) -> bool:
        return self.engine.sleeping is not None

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list:
        """vLLM's: `[func(model)]`, the engine's `torch.nn.Module` (its layers as polymodal
        builds them: fused projections, checkpoint names in `load_weights`). One entry: the
        model of a tensor-parallel engine's other ranks lives in their processes, which this
        call does not reach (refused)."""
        if self.engine.executor is not None:
            raise InvalidInputError(
                "apply_model reaches rank 0 only: not with tensor_parallel_size > 1"
            )
        return [func(self.engine.runner.model)]

    def start_profile(self) -> None:
        """vLLM's: record a torch profiler trace of the engine's work until `stop_profile`
        (needs `VLLM_TORCH_PROFILER_DIR`; llm_core/profiler.py)."""
        profiler.start_profile(self.engine)

    def get_metrics(self) -> list:
        """vLLM's: the engine's counters, gauges and histograms now (`Counter`, `Gauge`,
        `Histogram`, `Vector` of `polymodal.metrics_reader`), named as the server's
        `/metrics`; latencies from each request's arrival in the engine."""
        return self.metrics.snapshot(self.engine)

    def stop_profile(self) -> str:
        """vLLM's: stop the recording and write the trace; returns its path."""
        return profiler.stop_profile(self.engine)
