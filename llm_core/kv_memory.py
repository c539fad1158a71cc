"""How much KV cache an engine gets: the cache dtype, the blocks the memory budget holds (less
the encoder-output cache), the longest request they hold alone, and the cache tensors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from polymodal.llm_core.config import ModelConfig
from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.kv_cache_spec import KVCacheLayout
from polymodal.llm_core.quantization.base import check_fp8_device

if TYPE_CHECKING:
    from polymodal.llm_core.engine_config import EngineConfig

log = logging.getLogger("polymodal")

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's storage dtype for `EngineConfig.kv_cache_dtype`."""
    if name not in KV_CACHE_DTYPES:
        raise InvalidInputError(f"kv_cache_dtype={name!r}: choose from {list(KV_CACHE_DTYPES)}")
    if name == "auto":
        return model_dtype
    check_fp8_device(device, f"kv_cache_dtype={name!r}")
    return torch.float8_e4m3fn


def encoder_cache_bytes(cfg: EngineConfig, mc: ModelConfig) -> int:
    """Bytes the encoder-output cache may hold: `encoder_cache_mb`, else four steps' worth of
    encoder rows (`max_num_encoder_tokens`, default the token budget) at the decoder's hidden
    size and dtype."""
    if cfg.encoder_cache_mb is not None:
        return int(cfg.encoder_cache_mb * (1 << 20))
    rows = 4 * (cfg.max_num_encoder_tokens or cfg.max_num_batched_tokens)
    return rows * mc.hidden_size * mc.dtype.itemsize


def num_kv_blocks(
    kv_dtype: torch.dtype,
    layout: KVCacheLayout,
    cfg: EngineConfig,
    device: torch.device,
    max_len: int,
    reserved: int = 0,
    draft_block_bytes: int | None = 0,
) -> int:
    """KV blocks that fit the memory budget less `reserved` bytes (the encoder cache);
    `draft_block_bytes`: a draft model's pages at the same block ids (draft_model.py)."""
    if not layout.slots:
        return 1  # no layer keeps a KV cache
    # a block id is one page of every slot tensor
    per_block = layout.block_elements(cfg.block_size) * kv_dtype.itemsize + (draft_block_bytes or 0)
    if device.type == "cuda":
        # Weights are already on the card: what is free now, less the share we leave alone
        # and 1 GiB of headroom for activations, holds the KV cache. Blocks torch's allocator
        # still caches (an engine dropped before this one was built) count as free.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = free - total * (1 - cfg.gpu_memory_utilization) - (1 << 30) - reserved
    else:
        budget = cfg.cpu_kv_cache_gb * (1 << 30)
    # never more than can ever be used (+1: a windowed layout's null block)
    cap = cfg.max_num_seqs * layout.blocks_per_request(
        max_len, cfg.block_size, cfg.max_num_batched_tokens
    )
    return max(1, min(int(budget // per_block), cap + layout.has_windows))


def fit_one_request(
    layout: KVCacheLayout, num_blocks: int, cfg: EngineConfig, max_len: int, mc: ModelConfig
) -> int:
    """The longest request the pool holds alone (it must always fit), at most `max_len`. The
    default (the model's own context) shrinks to it with a warning; a `max_model_len` the
    user set that does not fit is an error."""
    usable = num_blocks - layout.has_windows  # the null block is never lent
    step = cfg.max_num_batched_tokens
    if layout.blocks_per_request(max_len, cfg.block_size, step) <= usable:
        return max_len
    fits = _longest_fitting(layout, usable, cfg, max_len)
    more = (
        "raise num_kv_blocks"
        if cfg.num_kv_blocks
        else "raise gpu_memory_utilization (GPU) or cpu_kv_cache_gb (CPU)"
    )
    if cfg.max_model_len:
        raise InvalidInputError(
            f"max_model_len={cfg.max_model_len} does not fit the KV cache: its {num_blocks} "
            f"blocks hold one request of at most {fits} tokens; lower max_model_len or {more}"
        )
    log.warning(
        "max_model_len is %d, not the model's own %d: the KV cache's %d blocks hold no longer "
        "request (%s for more)", fits, mc.max_position_embeddings, num_blocks, more,
    )  # fmt: skip
    return fits


def _longest_fitting(layout: KVCacheLayout, usable: int, cfg: EngineConfig, max_len: int) -> int:
    step = cfg.max_num_batched_tokens
    lo, hi = 0, max_len  # blocks_per_request grows with the length: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layout.blocks_per_request(mid, cfg.block_size, step) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocate_kv_caches(layout: KVCacheLayout, num_blocks, block_size, dtype, device) -> list:
    """Per layer its cache tensor (slot s of every group shares tensor s), None without one."""
    if not layout.slots:
        return [None] * len(layout.layer_slot)
    tensors = [
        torch.zeros(layout.cache_shape(s, num_blocks, block_size), dtype=dtype, device=device)
        for s in range(layout.slots)
    ]
    return [None if s is None else tensors[s[1]] for s in layout.layer_slot]
