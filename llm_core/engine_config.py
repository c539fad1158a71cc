"""Engine settings and the assembly of its parts (model, KV cache, scheduler, runner)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from polymodal.llm_core.attention import get_backend
from polymodal.llm_core.config import ModelConfig, load_config
from polymodal.llm_core.draft_model import build_draft_model
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.interfaces import is_pooling_model, supports_multimodal
from polymodal.llm_core.kv_cache import KVCacheManager
from polymodal.llm_core.kv_cache_spec import MLA, KVCacheLayout, plan_layout
from polymodal.llm_core.kv_memory import (
    allocate_kv_caches,
    encoder_cache_bytes,
    fit_one_request,
    kv_cache_dtype,
    num_kv_blocks,
)
from polymodal.llm_core.kv_offload import build_host_tier, check_offload_options
from polymodal.llm_core.layers.linear import enable_gemv
from polymodal.llm_core.layers.moe import enable_moe_decode
from polymodal.llm_core.load_warmup import warm_up_long_paths
from polymodal.llm_core.loader import build_model, load_tokenizer, resolve_model_path
from polymodal.llm_core.media_inputs import embeddings_cached
from polymodal.llm_core.quantization import resolve_quantization
from polymodal.llm_core.registry import model_class, tower_graphs
from polymodal.llm_core.runner import ModelRunner
from polymodal.llm_core.scheduler import Scheduler
from polymodal.llm_core.speculative import SpeculativeConfig
from polymodal.llm_core.tensor_parallel import SINGLE, TPGroup, tensor_parallel

log = logging.getLogger("polymodal")


@dataclass
class EngineConfig:
    """Knobs of one engine; names follow vLLM where vLLM has the same knob."""

    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    device: str = "auto"  # auto = cuda when available
    max_model_len: int | None = None  # default: the model's max_position_embeddings, or the
    # longest request the KV cache holds when less (with a warning)
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: from memory (GPU) or a fixed budget (CPU)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 1.0
    # Per-step token budget (chunked prefill) and running sequences; None = by device
    # (`resolve_batch_limits`: the bench's sizes on a large GPU, where the batch is what
    # makes captioning and a loaded server fast).
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    # An online server (`polymodal serve`): its default token budget on a GPU is half the
    # offline one (8192 on an H100+), as vLLM's API server's: a burst's first tokens come a
    # step sooner and, on the H200's image burst, requests/s was higher too (performance.md).
    serving: bool = False
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto | torch | triton
    # Which shapes torch's cuDNN SDPA gets (Triton backend; llm_core/attention/sdpa_shapes.py):
    # "second" bucketed lengths, a new shape built on its second sight (the Triton kernel
    # before), "first" bucketed, built on first sight, "exact" every length its own plan.
    sdpa_shapes: str = "second"
    dummy_weights: bool = False  # random weights from config.json alone (benchmarks)
    cuda_graphs: bool = True  # capture decoder CUDA graphs (CUDA + Triton backend only)
    max_graph_batch: int = 512  # decode steps of up to this many sequences replay a graph
    # Prefill / mixed steps of up to this many tokens (<= 8 sequences) replay a graph: a short
    # prompt's prefill is otherwise bound by kernel launches (a one-image prompt of Pixtral
    # takes 827 tokens). The graphs' pool holds the largest bucket's activations, about twice
    # 512's: ~0.1 GB for a 12B decoder at 1024 (Mistral-Nemo's gate_up output alone: 1024 x
    # 28672 bf16 = 59 MB; `PrefillGraphs.capture_cost` says what it took). 0 = always eager.
    max_prefill_graph_tokens: int = 1024
    skip_tokenizer_init: bool = False  # token ids in and out only (benchmarks)
    # Launch step N+1 before reading step N's tokens back (hides host time behind the GPU;
    # outputs are identical). None = on for CUDA, off on the CPU (no device to overlap with).
    async_scheduling: bool | None = None
    # Batch-1 decode: decoder linears and the LM head at one input row run a Triton GEMV
    # instead of cuBLAS (CUDA, fp16/bf16 weights only; elsewhere a no-op).
    decode_gemv: bool = True
    # Weight quantization (docs/quantization.md). None: as the checkpoint says (config.json's
    # `quantization_config`: awq, gptq, fp8, compressed-tensors, modelopt); "fp8" quantizes a
    # 16-bit checkpoint as it loads; naming the checkpoint's own scheme checks it.
    quantization: str | None = None
    # KV cache storage: "auto" = the model dtype; "fp8" = E4M3 with one scale per layer for
    # keys and one for values (the checkpoint's k_scale / v_scale, else 1.0): twice the tokens.
    kv_cache_dtype: str = "auto"
    # Multimodal models: embedding rows the encoders may produce in one step (None = the
    # token budget), and the encoder-output cache's size in MiB (None = four steps' worth of
    # rows at the model's hidden size and dtype). On a GPU the cache comes out of the KV
    # cache's share of memory.
    max_num_encoder_tokens: int | None = None
    encoder_cache_mb: float | None = None
    # LoRA adapters (vLLM's names): per-request PEFT adapters, up to `max_loras` of them in one
    # step, each of rank <= `max_lora_rank`; `max_cpu_loras` loaded adapters kept on the host.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Split the decoder over this many ranks (one process each; rank 0 is the engine's):
    # GPUs 0..N-1 on CUDA (NCCL), processes talking gloo on the CPU. 1 = today's in-process
    # path, unchanged. llm_core/executor.py; docs/serving.md says what is not done yet.
    tensor_parallel_size: int = 1
    seed: int = 0
    # vLLM's `runner`: "auto" (the architecture's task; a generation model with
    # sentence-transformers pooling files is an embedding model), "pooling" (a generation model
    # runs as an embedding model: last-token pooling + normalize unless its files say other),
    # "generate"
    runner: str = "auto"
    # vLLM's `hf_overrides`: only {"architectures": [name]} (serve the checkpoint as another
    # registered architecture: BAAI/bge-m3 as "BgeM3EmbeddingModel", as vLLM's docs say)
    hf_overrides: dict | None = None
    # Where a hub id is fetched from (vLLM's names): `revision` a branch, tag or commit (None:
    # main); `hf_token` a token, or True for the saved login (None: HF_TOKEN or that login).
    # Refused with a local checkpoint folder (nothing to pick a revision of).
    revision: str | None = None
    hf_token: str | bool | None = None
    download_dir: str | None = None  # the hub cache (None: huggingface_hub's default)
    # vLLM's: "fcfs" (arrival order), or "priority" (each request's `priority`, lower first;
    # the scheduler's docstring says how)
    scheduling_policy: str = "fcfs"
    # vLLM's: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a,
    # "prompt_lookup_max": b}; "draft_model" / "eagle" / "eagle3" with "model": DIR; "mtp"
    speculative_config: Any = None
    # vLLM's: the most logprobs (top-N per token, prompt logprobs) a request may ask for
    max_logprobs: int = 20
    # vLLM's: `sleep()` / `wake_up()` may free and retake the GPU memory (sleep.py)
    enable_sleep_mode: bool = False
    # vLLM's: prompts may be given as embeddings, `{"prompt_embeds": tensor}` (prompt_embeds.py)
    enable_prompt_embeds: bool = False
    # vLLM's: GiB of host memory under the prefix cache (kv_offload.py); backend "native" only
    kv_offloading_size: float | None = None
    kv_offloading_backend: str | None = None
    # vLLM's: "deepseek_r1" or "qwen3": structured output holds after `</think>`
    # (structured_output.py); the server's --reasoning-parser sets it too
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        """Refuse sizes out of range (0 or negative where a count is meant: never read as
        "the default"), naming the knob."""
        for name in ("max_model_len", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs",
                     "max_num_encoder_tokens", "max_cpu_loras"):  # fmt: skip
            _check_range(name, getattr(self, name), 1, none_ok=True)
        for name in ("block_size", "max_loras", "max_lora_rank", "tensor_parallel_size"):
            _check_range(name, getattr(self, name), 1)
        for name in ("max_graph_batch", "max_prefill_graph_tokens", "max_logprobs"):
            _check_range(name, getattr(self, name), 0)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidInputError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not self.cpu_kv_cache_gb > 0:
            raise InvalidInputError(f"cpu_kv_cache_gb must be positive, got {self.cpu_kv_cache_gb}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise InvalidInputError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        check_offload_options(self.kv_offloading_size, self.kv_offloading_backend)
        if self.encoder_cache_mb is not None and not self.encoder_cache_mb >= 0:
            raise InvalidInputError(f"encoder_cache_mb must be >= 0, got {self.encoder_cache_mb}")


def _check_range(name: str, value, low: int, none_ok: bool = False) -> None:
    """An integer knob `>= low` (None allowed with `none_ok`), else `InvalidInputError`."""
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise InvalidInputError(f"{name} must be >= {low}, got {value}")


# (min GPU memory in GiB, max_num_seqs, max_num_batched_tokens), first match wins. An H100 or
# H200 takes the bench's sizes (512 sequences, 16k tokens a step: docs/performance.md).
GPU_BATCH_LIMITS = ((70, 512, 16384), (30, 256, 8192), (0, 128, 4096))
CPU_BATCH_LIMITS = (256, 4096)


def resolve_batch_limits(cfg: EngineConfig, device: torch.device) -> EngineConfig:
    """`cfg` with `max_num_seqs` / `max_num_batched_tokens` set where they were None."""
    if cfg.max_num_seqs is not None and cfg.max_num_batched_tokens is not None:
        return cfg
    seqs, tokens = CPU_BATCH_LIMITS
    if device.type == "cuda":
        gib = torch.cuda.get_device_properties(device).total_memory / (1 << 30)
        seqs, tokens = next((s, t) for floor, s, t in GPU_BATCH_LIMITS if gib >= floor)
        tokens //= 2 if cfg.serving else 1
    return replace(
        cfg,
        max_num_seqs=cfg.max_num_seqs or seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens or tokens,
    )


@dataclass
class EngineParts:
    config: EngineConfig  # as given, with the device-dependent defaults resolved
    model_config: ModelConfig
    tokenizer: Any
    scheduler: Scheduler
    runner: ModelRunner
    max_model_len: int
    device: torch.device
    model_path: Path
    capture_graphs: Any  # () -> None: (re)capture the CUDA graphs this engine uses


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def resolve_model(path: Path, cfg: EngineConfig, rank: int = 0):
    """(model config, this rank's device, `cfg` with its device defaults, max_model_len)."""
    model_config = load_config(path, cfg.dtype, cfg.runner, cfg.hf_overrides)
    device = _device(cfg.device)
    if device.type == "cuda" and cfg.tensor_parallel_size > 1:
        device = torch.device("cuda", rank)  # rank r drives GPU r
    cfg = resolve_batch_limits(cfg, device)
    if device.type == "cpu" and model_config.dtype in (torch.float16,):
        model_config.dtype = torch.float32  # fp16 matmuls are slow or missing on CPU
    max_len = cfg.max_model_len or model_config.max_position_embeddings
    if cfg.max_model_len and cfg.max_model_len > model_config.max_position_embeddings:
        raise InvalidInputError(
            f"max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings="
            f"{model_config.max_position_embeddings}"
        )
    # sentence-transformers' longest input caps the context, as in vLLM
    seq_length = model_config.max_seq_length
    if seq_length is not None and cfg.max_model_len and cfg.max_model_len > seq_length:
        raise InvalidInputError(
            f"max_model_len={cfg.max_model_len} exceeds max_seq_length={seq_length} of "
            f"{path / 'sentence_bert_config.json'}"
        )
    if seq_length is not None:
        max_len = min(max_len, seq_length)
    return model_config, device, cfg, max_len


@dataclass
class RankParts:
    """What every tensor-parallel rank builds: its shard of the model and of the KV cache."""

    net: Any
    runner: ModelRunner
    layout: KVCacheLayout
    num_blocks: int
    max_len: int
    backend: Any


def build_rank(
    path: Path,
    model_config: ModelConfig,
    cfg: EngineConfig,
    device: torch.device,
    max_len: int,
    tp: TPGroup = SINGLE,
    before_sync=None,
) -> RankParts:
    """Build this rank's model (split over `tp`), KV cache and runner. With several ranks the
    KV block count is the smallest any rank holds (a collective: `before_sync()` runs first,
    e.g. rank 0 checking that every worker built its model)."""
    quant = resolve_quantization(
        model_config.quantization_config, cfg.quantization, cfg.dummy_weights, str(path)
    )
    if quant is not None:
        quant.check_device(device)
    kv_dtype = kv_cache_dtype(cfg.kv_cache_dtype, model_config.dtype, device)
    backend = get_backend(cfg.attention_backend, str(device), cfg.sdpa_shapes)
    # M-RoPE positions can run past the token count (video time axis): leave headroom. The
    # rotary tables hold every position: past 128k (Llama 4's 10M) only max_len's are kept.
    max_positions = max(max_len, min(model_config.max_position_embeddings, 131072)) + 1024
    with tensor_parallel(tp):
        net = build_model(
            model_config, device, backend, max_positions, cfg.dummy_weights, cfg.seed, quant
        )
    if kv_dtype != model_config.dtype:
        scales = net.checkpoint_kv_scales  # {layer: (k_scale, v_scale)}; 1.0 where absent
        for layer in net.attention_layers():
            layer.kv_scales = scales.get(layer, (1.0, 1.0))
    if cfg.decode_gemv:  # before graph capture, which records whichever kernel runs
        enable_gemv(net)
    pooling = is_pooling_model(net)  # runs prompts once: no prefix reuse, no decode graphs
    layout = plan_layout(net.kv_cache_specs())
    if kv_dtype != model_config.dtype and any(g.spec.kind == MLA for g in layout.groups):
        raise InvalidInputError(
            f"kv_cache_dtype={cfg.kv_cache_dtype!r}: the MLA latent cache of "
            f"{model_config.architecture} is kept in the model dtype; use kv_cache_dtype='auto'"
        )
    for layer, group in zip(net.attention_layers(), layout.layer_groups()):
        layer.kv_group = group or 0  # which block tables it reads
    # before the KV cache takes its share: the adapters' buffers (and the dense layers' weights,
    # moved into longer storage) count in the memory it measures
    from polymodal.llm_core.lora.engine_setup import engine_lora_manager  # LoRA: on demand

    lora = engine_lora_manager(net, cfg, device, pooling, model_config.dtype)
    if cfg.decode_gemv:  # after LoRA wraps the layers: a block whose shared experts carried
        enable_moe_decode(net)  # adapters would keep the unfused path (moe_decode has no LoRA)
    encoder_cache = encoder_cache_bytes(cfg, model_config) if supports_multimodal(net) else 0
    draft = build_draft_model(cfg, layout, device, model_config, net)  # pages at our block ids
    num_blocks = cfg.num_kv_blocks or num_kv_blocks(
        kv_dtype, layout, cfg, device, max_len, encoder_cache, draft and draft.block_bytes
    )
    if tp.size > 1:
        if before_sync is not None:
            before_sync()
        num_blocks = tp.min_int(num_blocks)  # every rank holds the same block ids
    max_len = fit_one_request(layout, num_blocks, cfg, max_len, model_config)
    kv_caches = allocate_kv_caches(layout, num_blocks, cfg.block_size, kv_dtype, device)
    graph_batch = min(cfg.max_graph_batch, cfg.max_num_seqs)
    draft = draft and draft.attach_kv(num_blocks, max_len, graph_batch)
    cross = layout.num_cross_groups
    runner = ModelRunner(
        net, kv_caches, cfg.block_size, device, layout.num_groups - cross, max(encoder_cache, 1),
        cross, max((g.spec.max_rows for g in layout.groups), default=0),
    )  # fmt: skip
    runner.lora, runner.draft = lora, draft
    return RankParts(net, runner, layout, num_blocks, max_len, backend)


def build_engine_parts(model: str, cfg: EngineConfig, executor=None) -> EngineParts:
    """The engine's parts; with an `executor` (tensor_parallel_size > 1) this process builds
    rank 0 while the executor's workers build the other ranks."""
    path = resolve_model_path(model, cfg.revision, cfg.hf_token, cfg.download_dir)
    model_config, device, cfg, max_len = resolve_model(path, cfg)
    tp = executor.group if executor is not None else SINGLE
    ready = executor.wait_ready if executor is not None else None
    rank = build_rank(path, model_config, cfg, device, max_len, tp, ready)
    net, runner, layout, max_len = rank.net, rank.runner, rank.layout, rank.max_len
    runner.executor = executor
    pooling = is_pooling_model(net)
    specs = [g.spec for g in layout.groups]
    prefix_caching = cfg.enable_prefix_caching and not pooling  # a cached prefix has no hidden
    kv = KVCacheManager(rank.num_blocks, cfg.block_size, prefix_caching, specs)
    kv.host = runner.kv_tier = build_host_tier(cfg, layout, runner, prefix_caching)
    scheduler = Scheduler(
        kv,
        cfg.max_num_batched_tokens,
        cfg.max_num_seqs,
        cfg.max_num_encoder_tokens,
        runner.encoder_cache,
        runner.lora,
        cfg.scheduling_policy,
    )
    if supports_multimodal(net):  # staging skips items the encoder will not see again
        net.embeddings_cached = partial(
            embeddings_cached, net, runner.encoder_cache, scheduler.max_num_encoder_tokens
        )
    # CUDA graphs with the collectives inside are not done yet: tensor parallelism runs eager
    graphs = cfg.cuda_graphs and not pooling and layout.slots and tp.size == 1
    graphs = graphs and device.type == "cuda" and rank.backend.name == "triton"
    capture = partial(capture_graphs, runner, cfg, max_len) if graphs else _no_graphs
    capture()
    if graphs:
        runner.warm_up_seconds = warm_up_long_paths(runner, max_len, rank.num_blocks)
        log.info(
            "load-time warm-up of long prompts and large media (cuDNN SDPA plans, Triton "
            "variants): %.2f s", runner.warm_up_seconds,
        )  # fmt: skip
    cls = model_class(model_config.architecture)
    tokenizer_dir = cls.tokenizer_dir(path) if hasattr(cls, "tokenizer_dir") else path
    tokenizer = None if cfg.skip_tokenizer_init else load_tokenizer(tokenizer_dir)
    return EngineParts(
        cfg, model_config, tokenizer, scheduler, runner, max_len, device, path, capture
    )


def capture_graphs(runner: ModelRunner, cfg: EngineConfig, max_len: int) -> None:
    """Capture the decoder's CUDA graphs (decode, small prefill steps) and let the towers
    capture theirs (at load, and again when an engine wakes up: `sleep.py`)."""
    net = runner.model
    runner.capture_decode_graphs(min(cfg.max_graph_batch, cfg.max_num_seqs), max_len)
    prefill_tokens = min(cfg.max_prefill_graph_tokens, cfg.max_num_batched_tokens)
    if prefill_tokens > 0 and getattr(net, "supports_prefill_graphs", True):
        spec = cfg.speculative_config  # verify steps: k + 1 tokens a sequence, as many as draft
        width = spec.num_speculative_tokens + 1 if spec is not None else 0
        seqs = min(cfg.max_num_seqs, (spec and spec.disable_by_batch_size) or cfg.max_num_seqs)
        runner.capture_prefill_graphs(prefill_tokens, max_len, width, seqs)
    if supports_multimodal(net):
        net.enable_cuda_graphs(tower_graphs)
    if runner.draft is not None:
        runner.draft.capture()


def _no_graphs() -> None:
    """An engine without CUDA graphs (CPU, the torch backend, pooling, tensor parallelism)."""
