"""Sleep mode (vLLM's `LLM.sleep` / `wake_up`, `enable_sleep_mode=True`): an idle engine gives
its GPU memory back, e.g. to a trainer sharing the GPU (RL), and takes it again later.

`sleep(level=1)` copies the weights to host memory and frees them and the KV cache; `level=2`
frees the parameters without a copy (the caller loads new ones after waking: `load_weights`;
buffers such as rotary tables are kept on the host, as vLLM's). A draft model (speculative
decoding) sleeps with the engine, its weights always kept on the host.
Memory is freed storage by storage (`untyped_storage().resize_(0)`, as FSDP frees parameters):
every tensor and view of the model keeps its identity, shapes and sharing (tied weights, packed
q/k/v views, a layer's fused copies), and `wake_up` gives each storage its bytes again. Storage
addresses change across a sleep, so the captured CUDA graphs (decoder and towers) are dropped on
sleep and captured again once weights and KV cache are both awake; the prefix and encoder caches
are emptied (their KV is gone).

`wake_up(tags)`: `["weights"]` first (then new weights can be loaded before the KV cache takes
its memory), then `["kv_cache"]`; no tags wakes both. The KV cache comes back zeroed.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.weight_update import reset_prefix_cache

TAGS = ("weights", "kv_cache")


@dataclass
class Sleep:
    """A sleeping engine's state: what is freed, and the weights' host copies (level 1)."""

    level: int
    weights: list = field(default_factory=list)  # (storage, its bytes, host copy or None)
    kv: list = field(default_factory=list)  # (storage, its bytes)
    asleep: set = field(default_factory=lambda: set(TAGS))


def sleep(engine, level: int = 1) -> None:
    """Free the engine's weights (level 1: kept on the host) and KV cache; see the module doc."""
    _check_enabled(engine, "sleep")
    if engine.sleeping is not None:
        raise InvalidInputError("sleep: the engine is asleep already; wake_up() first")
    if level not in (1, 2):
        raise InvalidInputError(f"sleep(level={level!r}): level must be 1 or 2")
    if engine.has_unfinished():
        raise InvalidInputError("sleep while requests run: let them finish or abort them")
    reset_prefix_cache(engine)
    runner = engine.runner
    drop_graphs(runner)
    state = Sleep(level)
    pin = runner.device.type == "cuda"
    params = {
        s.data_ptr() for s in _unique([p.untyped_storage() for p in runner.model.parameters()])
    }
    draft = runner.draft  # a draft model (speculative decoding): its weights and KV too
    caches = runner.kv_caches + (draft.kv_caches if draft is not None else [])
    kv = _unique([t.untyped_storage() for t in caches if t is not None])
    kv_ptrs = {s.data_ptr() for s in kv}
    # level 2 keeps the buffers, and the draft's weights (`load_weights` loads the target's)
    kept = [(s, level == 1 or s.data_ptr() not in params)
            for s in model_storages(runner.model, runner.device)]  # fmt: skip
    if draft is not None:
        kept += [(s, True) for s in model_storages(draft.net, runner.device)]
    with torch.inference_mode():
        for storage, copy in kept:
            if storage.data_ptr() in kv_ptrs:  # a layer's view of the KV cache: not a weight
                continue
            nbytes = storage.nbytes()
            host = None
            if copy:
                host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
                host.copy_(_bytes(storage))
            state.weights.append((storage, nbytes, host))
        state.kv = [(storage, storage.nbytes()) for storage in kv]
    for storage, *_ in state.weights + state.kv:
        storage.resize_(0)
    engine.sleeping = state
    _release_memory(runner.device)


def wake_up(engine, tags: list[str] | None = None) -> None:
    """Give back the memory of `tags` (default both); graphs are captured again once both are
    awake. Weights slept at level 2 come back uninitialized: load new ones."""
    _check_enabled(engine, "wake_up")
    state = engine.sleeping
    wanted = list(TAGS) if tags is None else list(tags)
    unknown = [t for t in wanted if t not in TAGS]
    if unknown:
        raise InvalidInputError(f"wake_up(tags={tags!r}): unknown tags {unknown}; tags: {TAGS}")
    if state is None:
        return  # awake already, as vLLM's
    with torch.inference_mode():
        if "weights" in wanted and "weights" in state.asleep:
            _give_back("weights", [(s, n) for s, n, _ in state.weights])
            for storage, _, host in state.weights:
                if host is not None:
                    _bytes(storage).copy_(host)
            state.weights, state.asleep = [], state.asleep - {"weights"}
        if "kv_cache" in wanted and "kv_cache" in state.asleep:
            _give_back("kv_cache", state.kv)
            for storage, _ in state.kv:
                _bytes(storage).zero_()
            state.kv, state.asleep = [], state.asleep - {"kv_cache"}
    if not state.asleep:
        engine.sleeping = None
        engine.capture_graphs()


def _give_back(tag: str, storages: list) -> None:
    """Each `(storage, bytes)` its memory again, all or none: out of memory (the GPU's other
    tenant still holds it), the ones given back are freed again and the error names the tag."""
    done = []
    try:
        for storage, nbytes in storages:
            storage.resize_(nbytes)
            done.append(storage)
    except torch.OutOfMemoryError as exc:
        for storage in done:
            storage.resize_(0)
        need = sum(n for _, n in storages) / (1 << 30)
        raise InvalidInputError(
            f"wake_up: not enough device memory for the {tag} ({need:.2f} GiB); free it and "
            "call wake_up again (the engine stays asleep)"
        ) from exc


def drop_graphs(runner) -> None:
    """Forget the runner's decode / prefill graphs and every tower's captured graphs (they
    replay fixed addresses)."""
    runner.graphs = None
    runner.prefill_graphs = None
    if runner.draft is not None:
        runner.draft.reset_graphs()
    for module in runner.model.modules():
        for value in vars(module).values():
            if hasattr(value, "graphs") and hasattr(value, "seen") and callable(value):
                value.graphs.clear()  # encoders.graphs.EncoderGraphs: captured again on use
                value.seen.clear()


def model_storages(model: torch.nn.Module, device: torch.device) -> list:
    """The storages of `model`'s tensors on `device`: parameters, buffers and tensors kept as
    module attributes (fused or packed copies), each storage once."""
    tensors = []
    for module in model.modules():
        tensors += module.parameters(recurse=False)
        tensors += module.buffers(recurse=False)
        for value in vars(module).values():
            values = value if isinstance(value, (list, tuple)) else (value,)
            tensors += [t for t in values if isinstance(t, torch.Tensor)]
    return _unique([t.untyped_storage() for t in tensors if t.device.type == device.type])


def _unique(storages: list) -> list:
    """Each storage once (views of one storage share it), empty ones left out."""
    seen, out = set(), []
    for storage in storages:
        key = storage.data_ptr()
        if storage.nbytes() and key not in seen:
            seen.add(key)
            out.append(storage)
    return out


def _bytes(storage) -> torch.Tensor:
    """A uint8 tensor over the whole storage."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _check_enabled(engine, method: str) -> None:
    if not engine.config.enable_sleep_mode:
        raise InvalidInputError(f"{method}() needs an engine built with enable_sleep_mode=True")
    if engine.executor is not None:
        raise InvalidInputError(f"{method}() is not supported with tensor_parallel_size > 1")


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
