"""`polymodal bench nvila-8b` (or a VILA / NVILA checkpoint in the hub's layout): NVILA through
`LLM.generate` next to the reference composed from transformers' blocks (`vila_reference.py`,
the one the parity tests hold ours to: transformers ships no VILA), on the same tensors, each
side alone on the device (the other waits in host memory).

    polymodal bench nvila-8b [--images 128] [--hf-images 16] [--hf-batch 8] [--video-frames 64]
    polymodal bench DIR --device cpu --images 2 --video-frames 4   # a tiny checkpoint (the test)

Workloads:
- captioning: N distinct 448x448 photo-like images, each with a question, exactly
  `--output-tokens` tokens each (EOS ignored; every request's count checked on both sides).
  Ours: `LLM.generate` over the N chat prompts. The reference: a subset of `--hf-images` in
  batches of `--hf-batch`, batched as the public `LlavaMetaForCausalLM.generate` batches:
  every image's dynamic-S2 tiles through the tower in one call, each prompt's embeddings
  spliced, left-padded under an attention mask, `llm.generate(inputs_embeds=...,
  max_new_tokens=T, min_new_tokens=T)`. Reported: images/s, output tokens/s, one image's
  latency alone (median of 3 fresh ones).
- video: one request of `--video-frames` 448x448 frames (a photo panning), NVILA's temporal
  compression on (TSP pooling: 64 frames -> 8 x 256 tokens). TTFT from the frames to the first
  token, preprocessing included, median of 3 fresh videos; the reference takes the frame count
  as VILA's `--num-video-frames` does (`config.num_video_frames`). Both sides' prompt lengths
  are checked equal (images too).

A built-in name is a shipped config without weights or tokenizer: the tokenizer is written
(`write_vila_checkpoint`: Qwen2's ids with VILA's media tokens), the weights are random bf16
(normal, std 0.02) made once, on the device, by the reference's modules; ours loads those
very tensors (`--dummy-weights` does the same for a checkpoint directory).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from polymodal.bench.vila_reference import IMAGE, VilaReference

SIZE = 448
QUESTION = "Describe this image in detail."
VIDEO_QUESTION = "Describe what happens in this video."
# the family's own defaults for the shared count options (`polymodal bench` applies them)
DEFAULTS = {"images": 128, "hf_images": 16, "hf_batch": 8}


def photos(n: int, seed: int) -> list[Image.Image]:
    """n distinct photo-like SIZE x SIZE images (`bench/media.py`'s colour fields)."""
    from polymodal.bench.media import photo

    return [photo((SIZE, SIZE), seed * 10_000 + i) for i in range(n)]


def video(frames: int, seed: int) -> list[Image.Image]:
    """A photo panning one pixel a frame: `frames` distinct SIZE x SIZE frames."""
    first = photos(1, seed)[0]
    return [first.transform(first.size, Image.AFFINE, (1, 0, i, 0, 1, 0)) for i in range(frames)]


def messages(media, kind: str = "image") -> list[dict]:
    text = QUESTION if kind == "image" else VIDEO_QUESTION
    content = [{"type": kind, kind: media}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def bench_checkpoint(model_dir: Path) -> Path:
    """`model_dir` when it holds a tokenizer (`llm/`, the hub's layout), else its configs with
    one (`write_vila_checkpoint`)."""
    from polymodal.bench.checkpoint import has_tokenizer, write_vila_checkpoint

    if has_tokenizer(model_dir / "llm"):
        return model_dir
    return write_vila_checkpoint(model_dir, Path(tempfile.mkdtemp(prefix="bench_vila_")))


class RandomVila(VilaReference):
    """The reference with random weights (built on its device) in place of the checkpoint's."""

    def load_models(self, root: Path) -> None:
        import transformers as tf

        def config(key: str, folder: str):
            inline = self.cfg.get(key)
            if isinstance(inline, dict) and "model_type" in inline:
                values = {k: v for k, v in inline.items() if not k.startswith("_")}
                return tf.AutoConfig.for_model(values.pop("model_type"), **values)
            return tf.AutoConfig.from_pretrained(root / folder)

        text, vision = config("llm_cfg", "llm"), config("vision_tower_cfg", "vision_tower")
        torch.manual_seed(0)
        with torch.device(self.device):
            self.llm = tf.AutoModelForCausalLM.from_config(
                text, dtype=self.dtype, attn_implementation="sdpa"
            )
            self.tower = tf.SiglipVisionModel._from_config(
                vision, dtype=self.dtype, attn_implementation="sdpa"
            )
            self.projector = self.new_projector(vision, text).to(self.dtype)
        with torch.no_grad():
            for module in (self.llm, self.tower, self.projector):
                for param in module.parameters():  # small weights: finite at any depth
                    if param.dim() >= 2:
                        param.normal_(0.0, 0.02)


def reference_tensors(ref: VilaReference):
    """The reference's tensors under the hub's names (`llm.`, `vision_tower.`,
    `mm_projector.layers.`), for ours to load."""
    parts = (("llm.", ref.llm), ("vision_tower.", ref.tower),
             ("mm_projector.layers.", ref.projector))  # fmt: skip
    for prefix, module in parts:
        for name, tensor in module.state_dict().items():
            yield prefix + name, tensor


class ReferenceSide:
    """The reference batched as the public `generate` batches (see the module docstring)."""

    def __init__(self, ref: VilaReference):
        self.ref = ref
        generation = ref.llm.generation_config
        generation.eos_token_id = None  # exactly the tokens asked for
        generation.pad_token_id = ref.tok.pad_token_id

    def image_prompts(self, pics: list) -> list[torch.Tensor]:
        """`[n, hidden]` embeddings of each image's prompt: NVILA's dynamic-S2 tiles of the
        whole batch through the tower at once; other image modes one prompt at a time."""
        ref = self.ref
        if ref.cfg["image_aspect_ratio"] != "dynamic_s2":
            return [ref.inputs_embeds([im, QUESTION]) for im in pics]
        views, blocks = zip(*(ref.s2_views(im) for im in pics))
        features = ref.image_embeds(ref.encode_images(torch.cat(views), list(blocks)))
        ids = ref.prompt_ids(IMAGE + QUESTION)
        return [ref.splice(ids, {"image": [f], "video": []}) for f in features]

    def video_prompt(self, frames: list) -> torch.Tensor:
        self.ref.cfg["num_video_frames"] = len(frames)  # VILA's --num-video-frames
        return self.ref.inputs_embeds([("video", frames), VIDEO_QUESTION])

    @torch.inference_mode()
    def generate_ids(self, prompts: list[torch.Tensor], tokens: int) -> torch.Tensor:
        """`[len(prompts), tokens]` greedy ids: the prompts left-padded into one batch."""
        width = max(len(p) for p in prompts)
        x = prompts[0].new_zeros(len(prompts), width, prompts[0].shape[-1])  # [b, width, hidden]
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=x.device)
        for row, prompt in enumerate(prompts):
            x[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        return self.ref.llm.generate(
            inputs_embeds=x, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
            do_sample=False,
        )  # fmt: skip

    def caption(self, pics: list, tokens: int) -> list[int]:
        """Output tokens of each image of one batch (inputs_embeds only: new tokens alone)."""
        with torch.inference_mode():
            prompts = self.image_prompts(pics)
        return [row.numel() for row in self.generate_ids(prompts, tokens)]

    def first_token(self, frames: list) -> int:
        """One video request to its first token; returns the prompt's length."""
        with torch.inference_mode():
            prompt = self.video_prompt(frames)
        self.generate_ids([prompt], 1)
        return len(prompt)


def ttft(first_token, device: str, videos: list) -> dict:
    """Median time (ms) of `first_token(frames)` over `videos`, each alone on the device; the
    prompt length it reports."""
    from polymodal.bench.sides import sync

    times, lengths = [], set()
    for frames in videos:
        sync(device)
        start = time.perf_counter()
        lengths.add(first_token(frames))
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if len(lengths) != 1:
        raise RuntimeError(f"video prompts of one frame count have lengths {sorted(lengths)}")
    return {"ttft_ms": statistics.median(times), "calls_ms": times, "prompt_tokens": lengths.pop()}


def run_bench(args) -> dict:
    """The bench (see the module docstring); returns the results."""
    from polymodal import LLM, SamplingParams
    from polymodal.bench import resolve_bench_model
    from polymodal.bench.sides import free_device, park, results_header, run_side, speedup

    device, frames = args.device, args.video_frames
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device (or --device cpu)")
    model_dir = bench_checkpoint(Path(resolve_bench_model(args.model)))
    random_weights = args.dummy_weights or not any(model_dir.glob("*/*.safetensors"))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kind = RandomVila if random_weights else VilaReference
    ref = ReferenceSide(kind(model_dir, device=device, dtype=dtype))
    results = results_header(args, device, dtype, random_weights, image_size=SIZE, frames=frames)
    for module in (ref.ref.llm, ref.ref.tower, ref.ref.projector):
        park(module, device)
    positions = ref.ref.llm.config.max_position_embeddings
    llm = LLM(
        str(model_dir), dtype=results["dtype"], device=device, dummy_weights=True,
        max_model_len=min(4096 + 40 * frames, positions), gpu_memory_utilization=0.85,
    )  # fmt: skip
    llm.engine.runner.model.load_weights(reference_tensors(ref.ref), "the reference")

    def ours(batch: list, n: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        out = llm.generate([{"messages": messages(im)} for im in batch], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in out]

    def ours_first_token(video_frames: list) -> int:
        prompt = {"messages": messages(video_frames, "video"), "num_frames": len(video_frames)}
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        return len(llm.generate(prompt, params, use_tqdm=False)[0].prompt_token_ids)

    pics, fresh = photos(args.images, seed=1), photos(3, seed=2)
    videos = [video(frames, seed) for seed in (3, 4, 5)]
    warm_pics, warm_videos = photos(2, seed=7), [video(frames, seed) for seed in (8, 9)]
    processed = llm.processor.process(messages=messages(warm_videos[0], "video"),
                                      num_frames=frames)  # fmt: skip
    results["video_tokens"] = processed.mm_items[0].num_embeds
    ours(warm_pics, 2)  # warm: kernels, graphs, worker threads, the tower's layouts
    lengths = {"image": len(llm.processor.process(messages=messages(fresh[0])).token_ids)}
    for frames_list in warm_videos:
        lengths["video"] = ours_first_token(frames_list)
    results["ours"] = {
        "captioning": run_side(ours, device, pics, args.output_tokens, len(pics), fresh, "ours"),
        "video": ttft(ours_first_token, device, videos),
    }
    if not args.skip_hf:
        del llm
        free_device(device)
        for module in (ref.ref.llm, ref.ref.tower, ref.ref.projector):
            module.to(device)
        with torch.inference_mode():  # like with like: the same prompt lengths
            seen = {"image": len(ref.image_prompts(fresh[:1])[0]),
                    "video": ref.first_token(warm_videos[0])}  # fmt: skip
        if seen != lengths:
            raise RuntimeError(f"prompt tokens: ours {lengths}, the reference {seen}")
        ref.caption(warm_pics[:1], 2)  # warm
        results["hf"] = {
            "captioning": run_side(
                ref.caption, device, pics[: args.hf_images], args.output_tokens, args.hf_batch,
                fresh, "the reference",
            ),
            "video": ttft(ref.first_token, device, videos),
        }  # fmt: skip
        results["hf"]["captioning"]["batch"] = args.hf_batch
        results["speedup"] = {
            "captioning": speedup(results["ours"]["captioning"], results["hf"]["captioning"]),
            "video_ttft": results["hf"]["video"]["ttft_ms"] / results["ours"]["video"]["ttft_ms"],
        }
    return results


def print_table(r: dict) -> None:
    """Captioning rates and one video's TTFT, ours next to the reference's."""
    from polymodal.bench.sides import print_rows

    ours, hf = r["ours"], r.get("hf", {})
    print(f"\n{r.get('card', r['device'])}  {r['date']}  {r['model']}  {r['dtype']}")
    print("transformers = the reference composed from transformers' blocks (vila_reference.py)")
    weights = "random weights: garbage tokens, " if r["random_weights"] else ""
    batch = f", reference batch {hf['captioning']['batch']}" if hf else ""
    print(
        f"\ncaptioning {r['image_size']}x{r['image_size']} images, {weights}exactly "
        f"{r['output_tokens']} output tokens each on both sides (checked){batch}"
    )
    print_rows(ours["captioning"], hf.get("captioning", {}), "images")
    if "speedup" in r:
        s = r["speedup"]["captioning"]
        print(f"speedup: images/s {s['requests_s']:.1f}x, latency {s['latency']:.1f}x")
    video = ours["video"]
    print(
        f"\nvideo: {r['frames']} frames of {r['image_size']}x{r['image_size']} in one request "
        f"-> {r['video_tokens']} video tokens (temporal compression), "
        f"{video['prompt_tokens']}-token prompt"
    )
    ref = f"{hf['video']['ttft_ms']:13.1f}" if hf else f"{'-':>13s}"
    print(f"{'metric':28s} {'polymodal':>10s} {'transformers':>13s}")
    print(f"{'TTFT ms (median of 3)':28s} {video['ttft_ms']:10.1f} {ref}")
    if "speedup" in r:
        print(f"speedup: TTFT {r['speedup']['video_ttft']:.1f}x")
