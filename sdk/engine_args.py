"""Engine options shared by the commands that build an engine (`serve`, `demo`, `caption`).

Kept apart from every optional extra: a command imports this without FastAPI, Gradio or Ray.
"""

from __future__ import annotations

import argparse
import json

# options whose value is JSON (vLLM's spellings), and on / off switches
JSON_OPTIONS = {
    "--limit-mm-per-prompt": "media items a prompt may hold: '{\"image\": 4}'",
    "--mm-processor-kwargs": "default media options: '{\"max_pixels\": N}'",
    "--media-io-kwargs": 'vLLM\'s video loader options: \'{"video": {"num_frames": N}}\'',
    "--override-generation-config": "sampling defaults over generation_config.json's (JSON)",
    "--speculative-config": 'drafts: \'{"method": "ngram", "num_speculative_tokens": 4}\', '
    'or "method": "draft_model" | "eagle" | "eagle3" with "model": DIR (docs/api.md)',
}
SWITCHES = {
    "--trust-remote-code": "accepted for vLLM's command lines: polymodal runs no checkpoint code",
    "--enable-prefix-caching": "reuse the KV blocks of shared prefixes (default on)",
    "--enable-chunked-prefill": "long prompts are always split across steps (--no-: refused)",
    "--async-scheduling": "launch each step before reading the last one's tokens back (default: "
    "on for CUDA, off on the CPU)",
}
# vLLM's engine options `LLM` takes only at vLLM's default value, or with nothing to do (logged;
# llm_options.VLLM_DEFAULT_ONLY / VLLM_NO_EFFECT say which and why): their value's type
VLLM_ACCEPTED = {
    "pipeline_parallel_size": int, "tokenizer_mode": str, "tokenizer_revision": str,
    "cpu_offload_gb": float, "model_impl": str, "swap_space": float,
    "max_seq_len_to_capture": int, "disable_custom_all_reduce": "switch",
    "max_parallel_loading_workers": int, "long_prefill_token_threshold": int,
    "max_num_partial_prefills": int, "cuda_graph_sizes": int, "compilation_config": json.loads,
}  # fmt: skip
VLLM_HELP = "vLLM's option: taken at vLLM's default only, or with no effect (docs/serving.md)"
# options passed to `LLM` as they are parsed (None: not given, the engine's default)
PASSED = (
    "device", "dtype", "max_model_len", "num_kv_blocks", "max_num_seqs",
    "max_num_batched_tokens", "gpu_memory_utilization", "quantization", "kv_cache_dtype",
    "max_loras", "max_lora_rank", "max_cpu_loras", "tensor_parallel_size", "runner",
    "hf_overrides", "revision", "hf_token", "scheduling_policy", "download_dir", "tokenizer",
    "enable_prefix_caching", "block_size", "limit_mm_per_prompt", "mm_processor_kwargs",
    "media_io_kwargs", "override_generation_config", "speculative_config", "max_logprobs",
    "async_scheduling", "kv_offloading_size", "kv_offloading_backend",
)  # fmt: skip


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the engine options (names as vLLM's where vLLM has the same knob)."""
    parser.add_argument(
        "--config",
        help="a YAML file of options (vLLM's): `max_model_len: 8192`, ...; the command line's "
        "options win (polymodal.config_file)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument(
        "--num-kv-blocks", "--num-gpu-blocks-override", type=int, help="the KV pool's blocks"
    )
    parser.add_argument("--max-num-seqs", type=int, help="default: by device (512 on an H100+)")
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="default: by device (16384 on an H100+; `serve`: half that)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="share of the GPU's memory the engine may use (default 0.9)",
    )
    parser.add_argument(
        "--quantization",
        choices=("awq", "gptq", "fp8", "compressed-tensors", "modelopt"),
        help="weight quantization: default as the checkpoint says; fp8 quantizes a 16-bit "
        "checkpoint on load (docs/quantization.md)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8"),
        help="fp8: E4M3 KV cache, twice the tokens (default auto: the model dtype)",
    )
    parser.add_argument(
        "--enable-lora", action="store_true", help="serve LoRA adapters (per request)"
    )
    parser.add_argument("--max-loras", type=int, help="adapters in one step (default 1)")
    parser.add_argument("--max-lora-rank", type=int, help="largest adapter rank (default 16)")
    parser.add_argument("--max-cpu-loras", type=int, help="loaded adapters kept on the host")
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        help="PEFT adapters served under their own model names (implies --enable-lora)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        help="split the decoder over N GPUs (N processes; gloo on CPU); default 1",
    )
    parser.add_argument(
        "--runner",
        choices=("auto", "generate", "pooling"),
        help="pooling: serve a generation model as an embedding model (vLLM's --runner); "
        "default auto: the architecture's task (with sentence-transformers pooling files: embed)",
    )
    parser.add_argument(
        "--hf-overrides",
        type=json.loads,
        help="vLLM's --hf-overrides, architectures only: '{\"architectures\": "
        '["BgeM3EmbeddingModel"]}\' (BAAI/bge-m3 with its lexical weights and ColBERT vectors)',
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs (vLLM's spelling)"
    )
    parser.add_argument(
        "--scheduling-policy",
        choices=("fcfs", "priority"),
        help="fcfs (default): arrival order; priority: each request's priority, lower first",
    )
    parser.add_argument("--revision", help="hub revision of the model: branch, tag or commit")
    parser.add_argument("--download-dir", help="the hub cache to download into / read from")
    parser.add_argument("--tokenizer", help="only the model's own (vLLM's option)")
    parser.add_argument("--block-size", type=int, help="tokens a KV block holds (default 16)")
    parser.add_argument(
        "--max-logprobs", type=int, help="most top logprobs a request may ask (default 20)"
    )
    parser.add_argument(
        "--enable-sleep-mode",
        action="store_true",
        help="the engine may free its GPU memory while idle (serve: POST /sleep, /wake_up)",
    )
    parser.add_argument(
        "--kv-offloading-size",
        type=float,
        help="GiB of host memory under the prefix cache: evicted blocks come back from it",
    )
    parser.add_argument("--kv-offloading-backend", choices=("native", "lmcache"))
    parser.add_argument(
        "--enable-prompt-embeds",
        action="store_true",
        help="prompts may be given as embeddings (completions' prompt_embeds: base64 tensors)",
    )
    for key, kind in VLLM_ACCEPTED.items():  # LLM refuses other values / logs "no effect"
        flag = "--" + key.replace("_", "-")
        if kind == "switch":
            parser.add_argument(flag, action="store_true", default=None, help=VLLM_HELP)
        else:
            nargs = "+" if key == "cuda_graph_sizes" else None
            parser.add_argument(flag, type=kind, nargs=nargs, help=VLLM_HELP)
    for flag, text in JSON_OPTIONS.items():
        parser.add_argument(flag, type=json.loads, help=text)
    for flag, text in SWITCHES.items():
        action = "store_true" if flag == "--trust-remote-code" else argparse.BooleanOptionalAction
        parser.add_argument(flag, action=action, help=text)
    parser.add_argument("--hf-token", help="Hugging Face token (default: HF_TOKEN or the login)")
    parser.add_argument(
        "--load-format",
        choices=("auto", "dummy"),
        default="auto",
        help="dummy: random weights from config.json alone (benchmarks, smoke tests)",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """`LLM` keywords (EngineConfig's and vLLM's) from the parsed engine options."""
    kwargs = {name: getattr(args, name) for name in (*PASSED, *VLLM_ACCEPTED)}
    kwargs.update(
        dummy_weights=args.load_format == "dummy" or None,
        enable_lora=bool(args.enable_lora or args.lora_modules) or None,
        cuda_graphs=False if args.enforce_eager else None,
        trust_remote_code=args.trust_remote_code or None,
        enable_sleep_mode=args.enable_sleep_mode or None,
        enable_prompt_embeds=args.enable_prompt_embeds or None,
    )
    if args.enable_chunked_prefill is False:
        raise SystemExit("--no-enable-chunked-prefill: polymodal always splits long prompts")
    return {k: v for k, v in kwargs.items() if v is not None}


def lora_modules(values: list[str] | None) -> dict:
    """`--lora-modules name=path ...` (vLLM's form; also a JSON object per value with
    `name`, `path`) -> served name -> `LoRARequest`, ids from 1 in order."""
    from polymodal.llm_core.lora.adapter import LoRARequest

    modules: dict = {}
    for value in values or ():
        if value.lstrip().startswith("{"):
            spec = json.loads(value)
            name, path = spec.get("name"), spec.get("path")
        else:
            name, _, path = value.partition("=")
        if not name or not path:
            raise ValueError(f"--lora-modules {value!r}: expected NAME=PATH")
        if name in modules:
            raise ValueError(f"--lora-modules: {name!r} is given twice")
        modules[name] = LoRARequest(name, len(modules) + 1, path)
    return modules
