"""The transformers side of `polymodal bench` (eager generate, sdpa attention)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from polymodal.bench.workloads import TEXT_TOKENS, caption_rates, images, text_ids


class HFSide:
    """transformers' Qwen2.5-VL built from config.json with random bf16 weights on the GPU."""

    def __init__(self, model_dir: Path):
        import transformers as tf

        cfg = tf.AutoConfig.from_pretrained(model_dir)
        torch.manual_seed(0)
        with torch.device("cuda"):
            self.model = tf.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
        self.model.eval()
        self.image_processor = tf.AutoImageProcessor.from_pretrained(model_dir)
        self.video_processor = None  # built on first use (media workload)
        self.cfg = cfg
        self.vocab = cfg.get_text_config().vocab_size
        self.model.generation_config.pad_token_id = cfg.get_text_config().eos_token_id

    def _inputs(self, pics, seed: int) -> dict:
        """A batch of identical-length prompts: image slots + TEXT_TOKENS text ids each."""
        vision = self.image_processor(images=pics, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = self.image_processor.merge_size**2
        rows = []
        for g in grid:
            slots = int(g.prod()) // merge
            rows.append(
                [self.cfg.vision_start_token_id]
                + [self.cfg.image_token_id] * slots
                + [self.cfg.vision_end_token_id]
                + text_ids(TEXT_TOKENS, seed, self.vocab)
            )
        ids = torch.tensor(rows, device="cuda")
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": vision["pixel_values"].to("cuda", torch.bfloat16),
            "image_grid_thw": grid.to("cuda"),
        }

    def media_inputs(self, kind: str, item, seed: int) -> dict:
        """One prompt around one image (PIL) or video (a list of frames, taken at 24 fps as
        our processor takes a frame list): media slots + TEXT_TOKENS text ids."""
        merge = self.image_processor.merge_size**2
        if kind == "image":
            vision = self.image_processor(images=[item], return_tensors="pt")
            grid, token, keys = vision["image_grid_thw"], self.cfg.image_token_id, "image"
        else:
            if self.video_processor is None:
                import transformers as tf

                self.video_processor = tf.Qwen2VLVideoProcessor()
            frames = np.stack([np.asarray(frame) for frame in item])
            vision = self.video_processor(
                videos=[frames], do_sample_frames=False, return_tensors="pt"
            )
            grid, token, keys = vision["video_grid_thw"], self.cfg.video_token_id, "video"
        slots = int(grid.prod()) // merge
        ids = [self.cfg.vision_start_token_id] + [token] * slots + [self.cfg.vision_end_token_id]
        ids = torch.tensor([ids + text_ids(TEXT_TOKENS, seed, self.vocab)], device="cuda")
        pixels = vision["pixel_values" if kind == "image" else "pixel_values_videos"]
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            ("pixel_values" if kind == "image" else "pixel_values_videos"): pixels.to(
                "cuda", torch.bfloat16
            ),
            f"{keys}_grid_thw": grid.to("cuda"),
        }
        if kind == "video":
            inputs["second_per_grid_ts"] = torch.tensor([2 / 24], device="cuda")
        return inputs

    @torch.inference_mode()
    def _generate(self, inputs: dict, n: int):
        return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def decode_ms(self, n: int) -> float:
        ids = torch.tensor([text_ids(TEXT_TOKENS, 1, self.vocab)], device="cuda")
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        timed = []
        for tokens in (1, n):
            torch.cuda.synchronize()
            start = time.perf_counter()
            self._generate(inputs, tokens)
            torch.cuda.synchronize()
            timed.append(time.perf_counter() - start)
        return (timed[1] - timed[0]) / (n - 1) * 1e3

    def ttft_ms(self, _image, repeats: int = 3) -> float:
        times = []
        for i, image in enumerate(images(repeats + 1, seed=4321)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            self._generate(self._inputs([image], 100 + i), 1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]) * 1e3

    def caption(self, pics, output_tokens: int, batch: int) -> dict:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(pics), batch):
            self._generate(self._inputs(pics[i : i + batch], i), output_tokens)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return {**caption_rates(len(pics), output_tokens, seconds), "batch": batch}
