"""Load-time warm-up of the long-prompt and large-media paths (CUDA; after graph capture in
`engine_config.build_engine_parts`), so that a first large request does not pay what compiles
or loads on first use.

What a first large request paid (H200, Qwen2.5-VL-7B, after the 448 px warm-up): a 1080p image
2.8 s against 0.1 s for the next ones, a 64-frame video 3.9 s against 1.9 s. Its one-time parts:
cuDNN's runtime-compiled SDPA engine and its first plan of a head dim (the decoder's causal
d 128, with and without LSE; the tower's d 80), Triton's variants of long launches (the
`LONG_QUERIES` tiles of the paged prefill and of the varlen kernel; the LSE merge; the
non-multiple-of-16 token counts of the norms and rotary kernels). Each new SDPA shape still
costs a cuDNN plan: `attention/sdpa_shapes.py` bounds and defers those.

The warm-up runs one synthetic sequence through the decoder (a fresh chunk of `chunk` tokens,
then a chunk after that many cached tokens: the SDPA route's two forms; then that chunk again
after one decode row: a mixed step's split, whose decode rows take the unfused decode kernel;
a cross-attention model's cross layers pass it through, as a text-only request's step)
and the model's encoder on dummy media (`SupportsMultiModal.warm_up_encoder`), each twice:
once with every cuDNN shape admitted (built now) and once with none (the Triton fallbacks
compiled). The synthetic tokens write K/V into the first blocks of the cache, which no
request holds yet; nothing else is kept.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace

import torch

from polymodal.llm_core.attention.metadata import AttentionMetadata

# Tokens of each synthetic chunk: above SDPA_MIN_CAUSAL and LONG_QUERIES (1024), and not a
# multiple of 16 (Triton specializes integer arguments on divisibility by 16).
WARM_CHUNK = 1100


def warm_up_long_paths(runner, max_len: int, num_blocks: int, chunk: int = WARM_CHUNK) -> float:
    """Run the warm-up (module doc) on `runner`'s model; returns the seconds it took (0.0 when
    the model's attention has no SDPA shape policy or the cache cannot hold two chunks)."""
    model = runner.model
    backends = {  # the decoder's layers' and the towers' (`attn_backend`)
        id(b): b
        for m in model.modules()
        for b in (getattr(m, "backend", None), getattr(m, "attn_backend", None))
        if hasattr(b, "shapes")
    }
    shapes = [b.shapes for b in backends.values()]
    fits = 2 * chunk + 1 <= min(max_len, num_blocks * runner.block_size)
    decoder = fits and runner.lora is None
    encoder = getattr(model, "warm_up_encoder", None)
    if not shapes or not (decoder or encoder):
        return 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for admit in (True, False):  # cuDNN plans built, then the Triton fallbacks compiled
            with ExitStack() as stack:
                for policy in shapes:
                    stack.enter_context(policy.building(admit))
                if decoder:
                    _prefill(runner, 0, chunk)
                    _prefill(runner, chunk, chunk)
                    _prefill(runner, chunk, chunk, decode_rows=1)  # a mixed step
                if encoder is not None:
                    encoder()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - start


def _prefill(runner, context: int, n: int, decode_rows: int = 0) -> None:
    """One eager decoder step of a single sequence: `n` new tokens at positions context..
    context + n - 1, its block table the cache's first blocks (slot == position); with
    `decode_rows`, that many one-token sequences first, each at position context + n of the
    same table (a mixed step: `AttentionMetadata.decode_split`)."""
    device, model = runner.device, runner.model
    total = context + n
    rows = decode_rows + n
    width = -(-(total + 1) // runner.block_size)
    table = torch.arange(width, dtype=torch.int32, device=device)[None].expand(decode_rows + 1, -1)
    positions = torch.cat([torch.full((decode_rows,), total, device=device),
                           torch.arange(context, total, device=device)])  # fmt: skip
    lens = [1] * decode_rows + [n]
    seq_lens = [total + 1] * decode_rows + [total]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.contiguous(),
        slot_mapping=positions,
        max_query_len=n,
        max_seq_len=total + 1,
        query_lens_cpu=lens,
        seq_lens_cpu=seq_lens,
    )
    if runner.num_kv_groups > 1 or runner.num_cross_groups:  # the same table and slots
        # a cross group (Mllama, Whisper): no encoder rows, as a text-only request's step, whose
        # cross layers pass the tokens through
        meta.groups = [meta] * runner.num_kv_groups + [replace(meta, any_cross=False)] * (
            runner.num_cross_groups
        )
    if runner.uses_mrope:  # text positions: the same on the three axes
        positions = positions.expand(3, rows)
    embeds = torch.zeros(rows, model.config.hidden_size, dtype=model.config.dtype, device=device)
    model(positions, embeds, runner.kv_caches, meta)
