"""Device A/B switches for processes a bench starts itself (a server and its engine process):
on PYTHONPATH, read at every interpreter's start. `AB_SEGMENTS=one`: a step's equal tower
segments as one SDPA call (before the thirty-seventh session); `AB_SEGMENTS=pow2`: as pure
power-of-2 pieces (that session's first rule, measured on an H200), instead of
`triton_backend.segment_groups`. `AB_MLLAMA=mask`: Mllama's tower attention as one
masked SDPA call over all rows (before the thirty-eighth session's unmasked pair of calls);
`AB_MLLAMA=cat`: the pair of calls concatenated before `o_proj` (before the thirty-ninth
session's parts-wise residual). `AB_CROSS_SPLIT=0`: cross prefill launches in one pass (no
split-KV, before the thirty-ninth session). `AB_STORE_AHEAD=0`: a step writing Mllama's encoder
rows runs eager (no `store_cross_states`). `AB_MLLAMA_RESIZE=host`: the Mllama processor
resizes on the host, as before the thirty-ninth session. `AB_MOE_LAUNCH=one`: decode MoE
blocks take `moe_layer`'s one persistent launch (`moe.ONE_LAUNCH_DECODE`)."""

import os

_RULE = os.environ.get("AB_SEGMENTS")
if _RULE in ("one", "pow2"):
    from polymodal.llm_core.attention import triton_backend

    def _groups(segments: int) -> list[int]:
        if _RULE == "one":
            return [segments]
        return [1 << b for b in reversed(range(segments.bit_length())) if segments >> b & 1]

    triton_backend.segment_groups = _groups

if os.environ.get("AB_MLLAMA") == "mask":  # Mllama's tower attention as one masked SDPA call
    import torch
    import torch.nn.functional as F

    from polymodal.encoders import mllama

    def _masked(self, x, real):
        n, length, _ = x.shape
        q, k, v = (
            p(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        rows = torch.arange(length, device=x.device) < real
        allowed = (rows[:, None] | rows[None, :]).expand(n, 1, length, length).contiguous()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return (self.o_proj(out.transpose(1, 2).reshape(n, length, -1)),)

    mllama.MllamaVisionAttention.forward = _masked

if os.environ.get("AB_MLLAMA") == "cat":  # the two calls' outputs concatenated, then o_proj
    import torch
    import torch.nn.functional as F

    from polymodal.encoders import mllama

    def _concatenated(self, x, real):
        n, length, _ = x.shape
        q, k, v = (
            p(x).view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q[:, :, :real], k, v)
        if real < length:
            pad = F.scaled_dot_product_attention(q[:, :, real:], k[:, :, :real], v[:, :, :real])
            out = torch.cat([out, pad], dim=2)
        return (self.o_proj(out.transpose(1, 2).reshape(n, length, -1)),)

    mllama.MllamaVisionAttention.forward = _concatenated

if os.environ.get("AB_CROSS_SPLIT") == "0":  # cross prefill in one pass
    from polymodal.llm_core.attention import triton_prefill
    from polymodal.llm_core.attention.spec import Mask

    _prefill = triton_prefill.paged_prefill

    def _one_pass_cross(*args, **kwargs):
        if args[6].mask == Mask.CROSS:
            kwargs["splits"] = 1
        return _prefill(*args, **kwargs)

    triton_prefill.paged_prefill = _one_pass_cross

if os.environ.get("AB_STORE_AHEAD") == "0":  # a step writing encoder rows runs eager
    from polymodal.llm_core.models import mllama as _mllama_model

    _mllama_model.MllamaForConditionalGeneration.store_cross_states = lambda *a: False

if os.environ.get("AB_MLLAMA_RESIZE") == "host":  # the canvas resize on the host, as before
    from functools import partial

    from polymodal.processors import mllama as _mllama_proc
    from polymodal.processors.pixels import resize

    _image_item = _mllama_proc.MllamaProcessor.image_item

    def _host_resize(self, image, options, pixels_key=None):
        item, text = _image_item(self, image, options, pixels_key)
        kw = item.pixel_fn.keywords
        item.data["pixel_frames"] = resize(item.data["pixel_frames"], kw["size"], kw["resample"])
        item.pixel_fn = partial(item.pixel_fn.func, **{**kw, "size": None})
        return item, text

    _mllama_proc.MllamaProcessor.image_item = _host_resize

_COMPILELOG = os.environ.get("AB_COMPILELOG")  # a file: each Triton compile, when and what
if _COMPILELOG:
    import time

    import triton

    _clog = open(f"{_COMPILELOG}.{os.getpid()}", "a", buffering=1)

    def _compiled(*, key, repr, fn, compile, **_):
        try:
            items = compile["constants"].items()
            consts = {k[-1] if isinstance(k, tuple) else k: v for k, v in items}
            spec = str(key)  # the arguments' specialization (divisibility, alignment)
        except Exception as e:  # the log must never fail a launch
            consts, spec = {}, f"({e!r}) {repr}"
        _clog.write(f"compile {time.monotonic():.6f} {getattr(fn, 'name', fn)} {consts} | {spec}\n")

    triton.knobs.runtime.jit_post_compile_hook = _compiled

_STEPLOG = os.environ.get("AB_STEPLOG")  # a file: each request's arrival and each step's work
if _STEPLOG:
    import time

    from polymodal.llm_core import scheduler as _scheduler

    _log = open(f"{_STEPLOG}.{os.getpid()}", "a", buffering=1)
    _add, _schedule = _scheduler.Scheduler.add, _scheduler.Scheduler.schedule

    def _logged_add(self, req):
        _log.write(f"add {time.monotonic():.6f}\n")
        return _add(self, req)

    _seen = set()  # requests already scheduled once (a prefix hit starts past token 0)

    def _logged_schedule(self):
        out = _schedule(self)
        prefill = decode = done = images = 0
        for req, n in zip(out.requests, out.num_new_tokens):
            prompt = len(req.prompt_token_ids)
            if req.num_computed_tokens >= prompt:
                decode += 1
                continue
            prefill += n
            if id(req) not in _seen:  # its first step: its images start (or hit the cache)
                _seen.add(id(req))
                images += len(req.mm_items)
            done += req.num_computed_tokens + n >= prompt
        _log.write(f"step {time.monotonic():.6f} {prefill} {decode} {done} {images}\n")
        return out

    _scheduler.Scheduler.add, _scheduler.Scheduler.schedule = _logged_add, _logged_schedule

if os.environ.get("AB_MOE_LAUNCH") == "one":  # decode MoE blocks in one persistent launch
    from polymodal.llm_core.layers import moe

    moe.ONE_LAUNCH_DECODE = True
