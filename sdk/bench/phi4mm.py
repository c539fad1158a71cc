"""`polymodal bench phi-4-multimodal` (or a Phi-4-multimodal checkpoint in transformers'
layout): chat requests through `LLM.generate` next to transformers' `Phi4MultimodalForCausalLM`
on the same weights, each side alone on the device.

Workloads (`--phi-workloads`), N distinct requests each, exactly `--output-tokens` tokens each:
- audio: a 30 s clip (tones over noise) + "Transcribe the audio clip into text." (the prompt
  `polymodal transcribe` gives a chat model);
- image: a 448x448 image (random pixels) + a question;
- mixed: an image and a clip in one request.
Ours: `LLM.generate` over chat messages (media processed on its worker threads); transformers:
its processor + `generate(max_new_tokens=T, min_new_tokens=T)` in batches of `--hf-batch`
(bf16, sdpa; a subset of `--hf-clips` requests). Reported per workload: requests/s, output
tokens/s and one request's latency alone (median of 3).

The LoRA adapters: the published model runs the speech adapter on audio-only prompts and the
vision adapter on any prompt with an image (the hub code; ours routes them the same way,
`Phi4MMForCausalLM.modality_adapter`). A built-in config has no adapters: random ones are
written at config.json's ranks (speech r 320, vision r 256) as `speech-lora/` and
`vision-lora/` PEFT folders. Ours applies the request's adapter unmerged (the LoRA kernels, as
for a real checkpoint); transformers runs each workload with that adapter merged into its
weights (before timing): the same function, at less cost than PEFT's unmerged adapter.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

RATE, CLIP_SECONDS = 16_000, 30
WORKLOADS = ("audio", "image", "mixed")
QUESTION = "Describe this image in detail."
ADAPTERS = {"audio": "speech", "image": "vision", "mixed": "vision"}  # modality_adapter's pick


def bench_checkpoint(model_dir: Path) -> tuple[Path, bool]:
    """(checkpoint, written here): `model_dir` when it has a tokenizer (transformers' layout),
    else a transformers-layout copy of its configs with a tokenizer."""
    from polymodal.bench.checkpoint import has_tokenizer, write_phi4mm_checkpoint

    if has_tokenizer(model_dir):
        config = json.loads((model_dir / "config.json").read_text())
        if config.get("model_type") != "phi4_multimodal":
            raise SystemExit(f"{model_dir}: transformers reads Phi-4-MM in its own layout only")
        return model_dir, False
    out = Path(tempfile.mkdtemp(prefix="bench_phi4mm_"))
    return write_phi4mm_checkpoint(model_dir, out), True


def merge_lora(model: torch.nn.Module, folder: Path, sign: float = 1.0) -> None:
    """Add (`sign=-1`: take back) the PEFT adapter in `folder` to `model`'s weights:
    W += sign * lora_alpha / r * B @ A."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scale = sign * config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            weight = model.get_submodule(module).weight
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            weight += scale * (b.to(weight) @ a.to(weight))


def write_random_adapters(model: torch.nn.Module, out: Path, config: dict, dtype) -> None:
    """Random `speech-lora/` and `vision-lora/` at config.json's ranks (small weights: the
    merged model stays near the base one)."""
    from polymodal.llm_core.models.phi4mm_tiny import write_lora

    for seed, name in enumerate(("speech", "vision")):
        section = config.get(f"{name}_lora") or {}
        if "r" in section:
            rank, alpha = int(section["r"]), section["lora_alpha"]
            write_lora(out / f"{name}-lora", model, rank, alpha, seed + 1, std=0.01, dtype=dtype)


def messages(kind: str, image=None, clip=None) -> list[dict]:
    """One request's chat messages of workload `kind`."""
    from polymodal.transcribe import transcription_prompt

    if kind == "audio":
        return transcription_prompt((clip, RATE))["messages"]
    parts = [{"type": "image", "image": image}]
    if kind == "mixed":
        parts.append({"type": "audio", "audio": (clip, RATE)})
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


def workload_inputs(kind: str, n: int, seed: int) -> list[list[dict]]:
    """n distinct requests (chat messages) of workload `kind`."""
    from polymodal.bench.workloads import clips, images

    pics = images(n, seed=seed) if kind != "audio" else [None] * n
    waves = clips(n, CLIP_SECONDS, RATE, seed=seed) if kind != "image" else [None] * n
    return [messages(kind, im, wave) for im, wave in zip(pics, waves)]


class HFPhi4:
    """transformers' Phi-4-multimodal and processor; `adapter` is the one merged now."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, random_weights: bool):
        import transformers as tf

        from polymodal.bench.sides import hf_model

        self.model = hf_model(
            tf.Phi4MultimodalForCausalLM, model_dir, device, dtype, random_weights
        )
        self.processor = tf.AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"
        self.model.generation_config.pad_token_id = self.processor.tokenizer.pad_token_id
        self.model.generation_config.eos_token_id = None  # exactly the tokens asked for
        self.model_dir, self.device, self.dtype = model_dir, device, dtype
        self.adapter: str | None = None

    def use_adapter(self, name: str | None) -> None:
        """Merge adapter `name` (its PEFT folder, if the checkpoint has it) in place of the
        one merged now."""
        if name == self.adapter:
            return
        for old, sign in ((self.adapter, -1.0), (name, 1.0)):
            folder = self.model_dir / f"{old}-lora"
            if old is not None and (folder / "adapter_config.json").is_file():
                merge_lora(self.model, folder, sign)
        self.adapter = name

    def inputs(self, batch: list[list[dict]]) -> dict:
        texts, pics, waves = [], [], []
        for msgs in batch:
            parts = msgs[0]["content"]
            texts.append(self.processor.tokenizer.apply_chat_template(
                [{"role": "user", "content": [p if p["type"] == "text" else {"type": p["type"]}
                                              for p in parts]}],
                tokenize=False, add_generation_prompt=True,
            ))  # fmt: skip
            pics += [p["image"] for p in parts if p["type"] == "image"]
            waves += [p["audio"][0] for p in parts if p["type"] == "audio"]
        out = self.processor(text=texts, images=pics or None, audio=waves or None,
                             return_tensors="pt", padding=True)  # fmt: skip
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
                for k, v in out.items()}  # fmt: skip

    @torch.inference_mode()
    def generate_ids(self, batch: list[list[dict]], tokens: int) -> torch.Tensor:
        """`[len(batch), tokens]` output ids of one batch (processing included)."""
        inputs = self.inputs(batch)
        out = self.model.generate(
            **inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
        )
        return out[:, inputs["input_ids"].shape[1] :]

    def generate(self, batch: list[list[dict]], tokens: int) -> list[int]:
        """Output tokens of each request of one batch."""
        return [row.numel() for row in self.generate_ids(batch, tokens)]


def run_bench(args) -> dict:
    """The bench (see the module docstring); returns the results."""
    from polymodal import LLM, SamplingParams
    from polymodal.bench import resolve_bench_model
    from polymodal.bench.sides import free_device, park, results_header, run_side, speedup

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("polymodal bench needs a CUDA device (or --device cpu)")
    kinds = [k.strip() for k in args.phi_workloads.split(",") if k.strip()]
    if not kinds or set(kinds) - set(WORKLOADS):
        raise SystemExit(f"--phi-workloads={args.phi_workloads}: choose from {WORKLOADS}")
    given = Path(resolve_bench_model(args.model))
    model_dir, written = bench_checkpoint(given)
    random_weights = args.dummy_weights or not any(model_dir.glob("*.safetensors"))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, hf_clips = args.output_tokens, args.hf_clips or 32
    hf = HFPhi4(model_dir, device, dtype, random_weights)
    if written:  # the built-in config: random adapters, both sides read the same files
        raw = json.loads((given / "config.json").read_text())
        write_random_adapters(hf.model, model_dir, raw, dtype)
    adapters = sorted(p.name for p in model_dir.glob("*-lora"))
    results = results_header(
        args, device, dtype, random_weights, clip_seconds=CLIP_SECONDS, adapters=adapters
    )
    park(hf.model, device)
    llm = LLM(
        str(model_dir), dtype=results["dtype"], device=device, dummy_weights=True,
        max_model_len=4096, gpu_memory_utilization=0.85,
    )  # fmt: skip
    llm.engine.runner.model.load_weights(hf.model.state_dict().items(), "transformers")

    def ours(batch: list, n: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        out = llm.generate([{"messages": m} for m in batch], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in out]

    inputs = {k: workload_inputs(k, args.clips, seed=i) for i, k in enumerate(kinds)}
    fresh = {k: workload_inputs(k, 3, seed=4321 + i) for i, k in enumerate(kinds)}
    for i, kind in enumerate(kinds):  # warm: kernels, graphs, worker threads
        ours(workload_inputs(kind, min(16, args.clips), seed=77 + i), 2)
    results["ours"] = {
        k: run_side(ours, device, inputs[k], tokens, len(inputs[k]), fresh[k], f"ours {k}")
        for k in kinds
    }
    if not args.skip_hf:
        del llm
        free_device(device)
        hf.model.to(device)
        results["hf"], results["speedup"] = {}, {}
        for kind in kinds:
            hf.use_adapter(ADAPTERS[kind])
            hf.generate(fresh[kind][:1], 2)  # warm
            results["hf"][kind] = run_side(
                hf.generate, device, inputs[kind][:hf_clips], tokens, args.hf_batch,
                fresh[kind], f"transformers {kind}",
            )  # fmt: skip
            results["speedup"][kind] = speedup(results["ours"][kind], results["hf"][kind])
    return results


def print_table(r: dict) -> None:
    """Per workload: requests/s, tokens/s and one request's latency, ours next to
    transformers'."""
    from polymodal.bench.sides import print_rows

    print(f"\n{r.get('card', r['device'])}  {r['date']}  {r['model']}  {r['dtype']}")
    weights = "random weights: garbage tokens, " if r["random_weights"] else ""
    print(
        f"chat requests, {weights}exactly {r['output_tokens']} output tokens each on both "
        f"sides (checked); adapters {', '.join(r['adapters']) or 'none'}: ours per request "
        "(unmerged), transformers merged for the workload"
    )
    for kind, ours in r["ours"].items():
        print(f"\n{kind} ({ADAPTERS[kind]} adapter)")
        print_rows(ours, r.get("hf", {}).get(kind, {}), "requests")
        if kind in r.get("speedup", {}):
            s = r["speedup"][kind]
            print(f"speedup: requests/s {s['requests_s']:.1f}x, latency {s['latency']:.1f}x")
