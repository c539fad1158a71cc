"""`polymodal bench whisper-large-v3` (a Whisper config or checkpoint): transcription through
the user path next to transformers on the same weights, each side alone on the device.

Workload: N distinct synthetic clips of one window (30 s at 16 kHz for large-v3: tones over
noise, fixed seed), each transcribed in English with exactly `--output-tokens` tokens.
- ours: `Pipeline` over a list of `{"audio": (waveform, 16000), "language": "en"}` requests
  (`max_tokens=T, ignore_eos=True`): the clips decoded, their log-mel features computed on the
  worker threads, the windows batched by the engine, as a user's call runs;
- transformers: `WhisperFeatureExtractor` + `WhisperForConditionalGeneration.generate(...,
  language="en", max_new_tokens=T, min_new_tokens=T)` in batches of `--hf-batch` (bf16, sdpa;
  on a subset of `--hf-clips`: its rate does not depend on the count).
Both apply the checkpoint's generation_config.json (suppressed tokens). Reported: clips/s,
output tokens/s, and the latency of one clip alone (median of 3, fresh clips). `--profile` adds
where our side's time goes (`bench/whisper_profile.py`: steps, phases, decode kernels).

Random weights (`--dummy-weights` or a built-in config) emit garbage tokens; the count is what
is compared, and the bench checks that every clip got exactly T on both sides. Their timestamp
tokens' embedding rows are zeroed (the output projection is tied: their logits are then 0,
below the best of the other 50k), so no clip emits a timestamp pair, which would move the
window and decode the clip's rest again (on both sides: transformers' generate does the same).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

RATE = 16_000


def bench_checkpoint(model_dir: Path) -> Path:
    """`model_dir` when it has a tokenizer; else a copy of its configs with Whisper's."""
    from polymodal.bench.checkpoint import has_tokenizer, write_whisper_checkpoint

    if has_tokenizer(model_dir):
        return model_dir
    return write_whisper_checkpoint(model_dir, Path(tempfile.mkdtemp(prefix="bench_whisper_")))


class HFWhisper:
    """transformers' Whisper on `device`: the checkpoint's weights, or random ones."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, random_weights: bool):
        import transformers as tf

        from polymodal.bench.sides import hf_model

        self.model = hf_model(
            tf.WhisperForConditionalGeneration, model_dir, device, dtype, random_weights
        )
        self.model.generation_config = tf.GenerationConfig.from_pretrained(model_dir)
        self.extractor = tf.WhisperFeatureExtractor.from_pretrained(model_dir)
        self.device, self.dtype = device, dtype
        if random_weights:
            self.silence_timestamps()

    def silence_timestamps(self) -> None:
        """Zero the timestamp tokens' embedding rows (see the module docstring)."""
        begin = self.model.generation_config.no_timestamps_token_id + 1
        with torch.no_grad():
            self.model.get_decoder().embed_tokens.weight[begin:] = 0

    @torch.inference_mode()
    def transcribe(self, waves: list, tokens: int) -> torch.Tensor:
        """The output tokens of `waves` (one batch), features extracted here."""
        features = self.extractor(waves, sampling_rate=RATE, return_tensors="pt").input_features
        features = features.to(self.device, self.dtype)
        out = self.model.generate(
            features, language="en", task="transcribe", max_new_tokens=tokens,
            min_new_tokens=tokens, do_sample=False,
        )  # fmt: skip
        return out


def tokens_before(row: torch.Tensor, eos: int) -> int:
    """Output tokens of one generated row before its first end-of-text (padding follows)."""
    ends = (row == eos).nonzero()
    return int(ends[0, 0]) if len(ends) else row.numel()


def run_bench(args) -> dict:
    """The bench (see the module docstring); returns the results."""
    from polymodal import Pipeline
    from polymodal.bench import resolve_bench_model
    from polymodal.bench.sides import free_device, park, results_header, run_side, speedup
    from polymodal.bench.workloads import clips

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device (or --device cpu)")
    if args.profile and device != "cuda":
        raise SystemExit("polymodal bench --profile: the kernel tables need a CUDA device")
    given = Path(resolve_bench_model(args.model))
    model_dir = bench_checkpoint(given)
    random_weights = args.dummy_weights or not any(model_dir.glob("*.safetensors"))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # transformers' model is built first (random or the checkpoint's), ours loads its tensors
    hf = HFWhisper(model_dir, device, dtype, random_weights)
    seconds, tokens = hf.extractor.chunk_length, args.output_tokens  # one window a clip
    results = results_header(args, device, dtype, random_weights, clip_seconds=seconds)
    park(hf.model, device)
    pipe = Pipeline(
        str(model_dir), dtype=results["dtype"], device=device, dummy_weights=True,
        gpu_memory_utilization=0.85,
    )  # fmt: skip
    pipe.llm.engine.runner.model.load_weights(hf.model.state_dict().items(), "transformers")

    def ours(waves: list, n: int) -> list[int]:
        requests = [{"audio": (w, RATE), "language": "en"} for w in waves]
        out = pipe(requests, temperature=0.0, max_tokens=n, ignore_eos=True)
        errors = [r.error for r in out if r.error]
        if errors:
            raise RuntimeError(f"our transcription failed: {errors[0]}")
        return [r.usage.completion_tokens for r in out]

    waves = clips(args.clips, seconds, RATE)
    fresh = clips(3, seconds, RATE, seed=4321)
    ours(clips(min(32, args.clips), seconds, RATE, seed=77), tokens)  # warm: kernels, threads
    results["ours"] = run_side(ours, device, waves, tokens, len(waves), fresh, "ours")
    if args.profile:
        from polymodal.bench.whisper_profile import profile_whisper

        results["profile"] = profile_whisper(pipe, ours, len(waves), seconds, tokens, device)
    if not args.skip_hf:
        del pipe
        free_device(device)
        hf.model.to(device)
        eos = hf.model.generation_config.eos_token_id

        def reference(batch: list, n: int) -> list[int]:
            return [tokens_before(row, eos) for row in hf.transcribe(batch, n)]

        reference(fresh[:1], 2)  # warm
        subset = waves[: args.hf_clips or 64]
        results["hf"] = run_side(
            reference, device, subset, tokens, args.hf_batch, fresh, "transformers"
        )
        results["hf"]["batch"] = args.hf_batch
        results["speedup"] = speedup(results["ours"], results["hf"])
    return results


def print_table(r: dict) -> None:
    """clips/s, tokens/s and one clip's latency, ours next to transformers'."""
    from polymodal.bench.sides import print_rows

    print(f"\n{r.get('card', r['device'])}  {r['date']}  {r['model']}  {r['dtype']}")
    weights = "random weights: garbage tokens, " if r["random_weights"] else ""
    print(
        f"transcription of {r['clip_seconds']} s clips, language en, {weights}exactly "
        f"{r['output_tokens']} output tokens a clip on both sides (checked)"
    )
    print_rows(r["ours"], r.get("hf", {}), "clips")
    if "speedup" in r:
        s = r["speedup"]
        print(
            f"speedup vs transformers: clips/s {s['requests_s']:.1f}x, latency {s['latency']:.1f}x"
        )
    if "profile" in r:
        from polymodal.bench.whisper_profile import print_profile

        print_profile(r["profile"], r["ours"]["requests"])
