"""`CaptionPredictor`: caption a Ray Dataset with one polymodal engine per Ray worker.

    import ray
    from polymodal.ray_predictor import CaptionPredictor

    ds = ray.data.read_images("s3://bucket/images/", include_paths=True, mode="RGB")
    ds = ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={"model": "Qwen/Qwen2.5-VL-7B-Instruct", "max_tokens": 128},
        concurrency=8,          # 8 engines (actors), e.g. one per GPU
        num_gpus=1,             # per actor
        batch_size=64,          # rows handed to one engine call; all run as one batch
    )
    ds.write_parquet("s3://bucket/captions/")

Each row needs a media column: `image` (an array from `read_images`, or bytes) or `path`
(a file path / URL the worker can read; videos by extension). A row whose media cannot be
read gets an `error` and an empty caption; the batch goes on.
"""

from __future__ import annotations

from contextlib import closing
from typing import Any

import numpy as np

from polymodal.caption import DEFAULT_PROMPT, fill_template
from polymodal.caption_io import media_kind
from polymodal.feeder import run_prompts


def actor_resources(workers: int, use_gpu: bool, gpus_per_worker: int = 1) -> dict[str, float]:
    """`map_batches` resources for `workers` engine actors that leave one CPU of the cluster to
    Ray Data's own tasks (reading, decoding, writing): with every CPU held by an actor, a read
    task never gets one and the job waits forever (2 CPUs, 2 CPU actors).

    A GPU actor asks for `gpus_per_worker` GPUs (its engine's `tensor_parallel_size`: Ray
    gives the actor those GPUs as its visible devices) and a share of the spare CPUs; a CPU
    actor for its share."""
    import ray

    if not ray.is_initialized():
        ray.init()
    spare = max(0.0, ray.cluster_resources().get("CPU", 1.0) - 1.0)
    share = round(min(1.0, spare / max(1, workers)), 3)
    if use_gpu:
        if gpus_per_worker < 1:
            raise ValueError(f"gpus_per_worker must be >= 1, got {gpus_per_worker}")
        return {"num_gpus": gpus_per_worker, "num_cpus": share}
    return {"num_cpus": max(share, 0.001)}


class CaptionPredictor:
    """A callable class for `Dataset.map_batches`: loads the model once per actor.

    Adds columns `caption`, `error` (None when fine), `finish_reason`, `completion_tokens`.
    """

    def __init__(
        self,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        image_column: str = "image",
        path_column: str = "path",
        max_tokens: int = 128,
        temperature: float = 0.0,
        seed: int | None = None,
        max_pixels: int | None = None,
        fps: float | None = None,
        num_frames: int | None = None,
        **engine_kwargs: Any,
    ):
        from polymodal.llm import LLM
        from polymodal.llm_core.sampling_params import SamplingParams

        self.llm = LLM(model, **engine_kwargs)
        self.prompt = prompt
        self.image_column, self.path_column = image_column, path_column
        self.params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
        options = {"max_pixels": max_pixels, "fps": fps, "num_frames": num_frames}
        self.media_options = {k: v for k, v in options.items() if v is not None}

    def _request(self, batch: dict[str, Any], i: int) -> dict[str, Any]:
        """The chat prompt of row `i`: media from the image column, else the path column."""
        path = str(batch[self.path_column][i]) if self.path_column in batch else ""
        if self.image_column in batch and batch[self.image_column][i] is not None:
            kind, source = "image", batch[self.image_column][i]
            if isinstance(source, np.ndarray) and source.dtype != np.uint8:
                source = source.astype(np.uint8)
        elif path:
            kind, source = media_kind(path), path
        else:
            raise ValueError(f"row has neither {self.image_column!r} nor {self.path_column!r}")
        text = fill_template(self.prompt, kind, path)
        content = [{"type": kind, kind: source}, {"type": "text", "text": text}]
        return {"messages": [{"role": "user", "content": content}], **self.media_options}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Caption every row of a batch (numpy format) in one continuous batch."""
        n = len(next(iter(batch.values()))) if batch else 0
        captions, errors = [""] * n, [None] * n
        reasons, tokens = [None] * n, [0] * n
        items = []
        for i in range(n):
            try:
                items.append((i, self._request(batch, i), self.params))
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                errors[i] = f"{type(exc).__name__}: {exc}"
        with closing(run_prompts(self.llm, items)) as finished:
            for done in finished:
                i = done.key
                if done.error is not None:
                    errors[i] = f"{type(done.error).__name__}: {done.error}"
                    continue
                captions[i] = done.output.outputs[0].text
                reasons[i] = done.output.outputs[0].finish_reason
                tokens[i] = done.output.usage.completion_tokens
        return {
            **batch,
            "caption": np.array(captions, dtype=object),
            "error": np.array(errors, dtype=object),
            "finish_reason": np.array(reasons, dtype=object),
            "completion_tokens": np.array(tokens, dtype=np.int64),
        }
