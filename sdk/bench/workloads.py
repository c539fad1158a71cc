"""The polymodal side of `polymodal bench`: decode, TTFT and captioning workloads."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from polymodal.feeder import PREFETCH, PROCESS_WORKERS
from polymodal.llm_core.engine import Engine
from polymodal.llm_core.engine_config import EngineConfig
from polymodal.llm_core.sampling_params import SamplingParams
from polymodal.processors.chat import MediaRef
from polymodal.processors.qwen_config import load_qwen_vl_config
from polymodal.processors.qwen_vl import QwenVLProcessor

TEXT_TOKENS = 32


def images(n: int, size: int = 448, seed: int = 0) -> list[Image.Image]:
    """n distinct random RGB images (distinct content: no cache hit helps anyone)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def clips(n: int, seconds: float, rate: int = 16_000, seed: int = 0) -> list[np.ndarray]:
    """n distinct float32 clips of `seconds` at `rate`: three random tones (100-4000 Hz) over
    noise, each clip its own draw (distinct content: no cache hit helps anyone)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    out = []
    for _ in range(n):
        freqs, amps = rng.uniform(100, 4000, 3), rng.uniform(0.05, 0.3, 3)
        wave = sum(a * np.sin(2 * np.pi * f * t) for f, a in zip(freqs, amps))
        noise = rng.standard_normal(t.size).astype(np.float32) * 0.02
        out.append((wave + noise).astype(np.float32))
    return out


def decoder_bytes(model) -> int:
    """Bytes one decode step must read: every decoder weight and the LM head, once."""
    parts = [model.model.layers, model.model.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for m in parts for p in m.parameters())


def active_decoder_bytes(model, num_tokens: int = 1) -> float:
    """Bytes a decode step of `num_tokens` sequences reads when MoE layers read only the experts
    chosen: `decoder_bytes` less the experts no token picked. One token reads exactly `top_k`
    experts a layer; more count the experts expected under uniform routing,
    `E * (1 - (1 - top_k / E) ** num_tokens)`."""
    from polymodal.llm_core.layers.moe import FusedMoE

    total = float(decoder_bytes(model))
    for block in model.modules():  # MoE blocks: `experts` (a FusedMoE) and `top_k`
        if isinstance(getattr(block, "experts", None), FusedMoE):
            experts, top_k = block.experts.num_experts, block.top_k
            chosen = experts * (1 - (1 - top_k / experts) ** num_tokens)
            total -= (experts - chosen) * block.experts.expert_bytes()
    return total


def caption_rates(images: int, output_tokens: int, seconds: float) -> dict:
    """The captioning numbers both sides report."""
    return {
        "caption_seconds": seconds,
        "images_s": images / seconds,
        "output_tokens_s": images * output_tokens / seconds,
        "caption_images": images,
    }


def text_ids(n: int, seed: int, vocab: int = 152064) -> list[int]:
    """Random ordinary-token ids (special tokens sit at the ends of the vocab)."""
    return (
        np.random.default_rng(seed).integers(min(1000, vocab // 4), min(100000, vocab), n).tolist()
    )


def _max_positions(model_dir: Path) -> int:
    """The text model's max_position_embeddings (tiny test checkpoints have fewer than 4096)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    return config.get_text_config().max_position_embeddings


class OurSide:
    """One engine on the GPU, with token-id prompts (no tokenizer needed)."""

    def __init__(
        self,
        model_dir: Path,
        dummy_weights: bool,
        weights_from=None,
        async_scheduling=True,
        decode_gemv=True,
        max_model_len: int | None = None,
        prefix_caching: bool = False,
        quantization=None,
        kv_cache_dtype="auto",
        sdpa_shapes="second",
        speculative_config=None,
        max_num_batched_tokens=16384,
    ):
        """`max_model_len` (default 4096) and `prefix_caching` (default off: distinct inputs
        everywhere) are for workloads of long media (`bench/media.py`); `sdpa_shapes` and
        `max_num_batched_tokens` as `EngineConfig`'s (A/B runs)."""
        config = EngineConfig(
            quantization=quantization,
            kv_cache_dtype=kv_cache_dtype,
            dtype="bfloat16",
            dummy_weights=dummy_weights or weights_from is not None,
            skip_tokenizer_init=True,
            max_model_len=max_model_len or min(4096, _max_positions(model_dir)),
            max_num_seqs=512,
            max_graph_batch=512,
            max_num_batched_tokens=max_num_batched_tokens,
            gpu_memory_utilization=0.85,
            enable_prefix_caching=prefix_caching,
            async_scheduling=async_scheduling,
            decode_gemv=decode_gemv,
            sdpa_shapes=sdpa_shapes,
            speculative_config=speculative_config,
        )
        self.engine = Engine(str(model_dir), config)
        self.model = self.engine.runner.model
        self.vocab = self.engine.model_config.vocab_size
        self.ttft_calls = 0  # each TTFT call draws new images
        if weights_from is not None:  # the very tensors transformers runs
            self.model.load_weights(weights_from.state_dict().items(), "transformers model")
        self.processor = QwenVLProcessor(None, load_qwen_vl_config(model_dir))
        cfg = self.processor.config
        self.image_prefix = [
            cfg.vision_start_token_id,
            cfg.image_token_id,
            cfg.vision_start_token_id + 1,
        ]

    def _prompt(self, image, seed: int):
        ids = self.image_prefix + text_ids(TEXT_TOKENS, seed, self.vocab)
        prompt = self.processor.process_tokens(ids, [MediaRef("image", image)])
        self.model.stage_ahead(prompt.mm_items)  # H2D in the preprocessing thread
        return prompt

    def _add(self, p, max_tokens: int) -> str:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return self.engine.add_processed(p, params)

    def decode_ms(self, n: int) -> float:
        """Median inter-token time of one request decoding alone (after its first token)."""
        p = self.processor.process_tokens(text_ids(TEXT_TOKENS, 1, self.vocab), [])
        self._add(p, n)
        stamps = []
        while self.engine.has_unfinished():
            if self.engine.step():  # an output means its ids were read back: no extra sync
                stamps.append(time.perf_counter())
        gaps = np.diff(stamps[1:])
        return float(np.median(gaps) * 1e3)

    def decode_wall_ms(self, n: int, repeats: int = 3) -> float:
        """Per-token wall time as a user times it: a request of n + 1 tokens minus one of 1
        token, over n (median of `repeats`; every host cost on the way is included)."""

        def wall(max_tokens: int) -> float:
            p = self.processor.process_tokens(text_ids(TEXT_TOKENS, 1, self.vocab), [])
            start = time.perf_counter()
            self._add(p, max_tokens)
            self.engine.run_until_done()
            return time.perf_counter() - start

        wall(2)  # warm
        diffs = [wall(n + 1) - wall(1) for _ in range(repeats)]
        return statistics.median(diffs) / n * 1e3

    def ttft_ms(self, _image, repeats: int = 5) -> float:
        """Median time from raw image + ids to the first output token (processing included).
        Every call draws new images: a repeated one would hit the encoder cache. Each call's
        split (processing, staging, engine) is kept in `ttft_calls_ms`."""
        self.ttft_calls += 1
        fresh = images(repeats + 1, seed=1000 * self.ttft_calls)
        times, self.ttft_calls_ms = [], []
        for i, image in enumerate(fresh):
            torch.cuda.synchronize()
            start = time.perf_counter()
            ids = self.image_prefix + text_ids(TEXT_TOKENS, 100 + i, self.vocab)
            prompt = self.processor.process_tokens(ids, [MediaRef("image", image)])
            processed = time.perf_counter()
            self.model.stage_ahead(prompt.mm_items)
            staged = time.perf_counter()
            rid = self._add(prompt, 1)
            while not any(o.request_id == rid for o in self.engine.step()):
                pass
            end = time.perf_counter()  # the first token is on the host now
            times.append(end - start)
            split = {"process": processed - start, "stage": staged - processed}
            split["engine"] = end - staged
            self.ttft_calls_ms.append({k: round(v * 1e3, 3) for k, v in split.items()})
            self.engine.step()  # max_tokens=1 finished it; resolve a step left in flight
        return statistics.median(times[1:]) * 1e3  # the first run warms the encoder kernels

    def caption(self, pics, output_tokens: int) -> dict:
        """All images through the engine; preprocessing overlaps decoding on a thread pool,
        up to `PREFETCH` images ahead of the engine (as `polymodal caption`)."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        todo = iter(enumerate(pics))
        with ThreadPoolExecutor(PROCESS_WORKERS) as pool:
            pending = [pool.submit(self._prompt, img, i) for i, img in islice(todo, PREFETCH)]
            while pending or self.engine.has_unfinished():
                while pending and pending[0].done():
                    self._add(pending.pop(0).result(), output_tokens)
                    pending.extend(pool.submit(self._prompt, img, i) for i, img in islice(todo, 1))
                if self.engine.has_unfinished():
                    self.engine.step(finished_only=True)
                elif pending:
                    pending[0].result()
        torch.cuda.synchronize()
        return caption_rates(len(pics), output_tokens, time.perf_counter() - start)

    def free(self) -> None:
        """Drop the engine and give its GPU memory back (`bench.text.release_memory`)."""
        from polymodal.bench.text import release_memory

        del self.engine, self.model
        release_memory()
