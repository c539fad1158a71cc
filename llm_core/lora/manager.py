"""Adapter slots: which loaded adapters sit in the layers' `max_loras` slots, and who uses them.

Adapters are read from disk when a request first names them (`load`, on the caller's
thread: a bad adapter fails that request alone), kept on the host (at most `max_cpu_loras`,
least recently used dropped first), and copied into a slot when the scheduler admits a request
that uses one (`acquire`). A slot is held while any admitted request uses its adapter; an
unheld slot keeps its weights (a later request of the same adapter finds them) until another
adapter needs the room. A request whose adapter finds no free slot waits, so a step never holds
more than `max_loras` adapters.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from polymodal.llm_core.errors import InvalidInputError
from polymodal.llm_core.lora.adapter import LoRAAdapter, LoRARequest, load_adapter
from polymodal.llm_core.lora.layer import LoRABatch, wrap_model


class LoRAManager:
    """Loads adapters, assigns slots, and fills the step's token -> slot mapping."""

    def __init__(self, model, max_loras: int, max_rank: int, max_tokens: int, device,
                 max_cpu_loras: int | None = None, dtype: torch.dtype = torch.float32):  # fmt: skip
        if max_loras < 1:
            raise InvalidInputError(f"max_loras must be >= 1, got {max_loras}")
        if max_rank < 1:
            raise InvalidInputError(f"max_lora_rank must be >= 1, got {max_rank}")
        if not model.supports_lora:
            raise InvalidInputError(f"{type(model).__name__} does not support LoRA adapters")
        self.max_loras, self.max_rank = max_loras, max_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.batch = LoRABatch(max_loras, max_tokens, device)
        self.layers = wrap_model(model, self.batch, max_loras, max_rank, dtype)
        if not self.layers:
            raise InvalidInputError(f"{type(model).__name__} has no layers that take LoRA")
        self.packed = getattr(model, "packed_modules_mapping", {})
        self.remap = getattr(model, "weight_name_remap", ())
        self.loaded: OrderedDict[tuple, LoRAAdapter] = OrderedDict()  # host copies, LRU order
        self.slot_key: list[tuple | None] = [None] * max_loras  # adapter in each slot
        self.slot_users = [0] * max_loras  # admitted requests using each slot
        self.slot_order: list[int] = list(range(max_loras))  # unheld slots, LRU first
        self.ids: dict[int, tuple] = {}  # lora_int_id -> its request's cache key
        self.pinned: set[tuple] = set()  # registered adapters, never dropped
        self._lock = threading.Lock()  # `load` runs on worker threads

    def load(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of `request`, read and checked on first use (raises InvalidInputError)."""
        if not isinstance(request, LoRARequest):
            raise InvalidInputError(
                f"lora_request must be a polymodal.LoRARequest, got {type(request).__name__}"
            )
        key = request.cache_key
        with self._lock:
            known = self.ids.get(request.lora_int_id)
            if known is not None and known != key:
                raise InvalidInputError(
                    f"lora_int_id {request.lora_int_id} already names adapter {known[2]!r}; "
                    f"{request.lora_name!r} ({request.lora_path}) needs another id"
                )
            adapter = self.loaded.get(key)
            if adapter is not None:
                self.loaded.move_to_end(key)
                return adapter
        adapter = load_adapter(request, self.layers, self.packed, self.remap, self.max_rank)
        with self._lock:
            self.ids[request.lora_int_id] = key
            self.loaded[key] = adapter
            while len(self.loaded) > self.max_cpu_loras:  # drop the least recent unslotted
                old = next((k for k in self.loaded
                            if k not in self.slot_key and k not in self.pinned), None)  # fmt: skip
                if old is None:
                    break
                del self.loaded[old]
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Forget adapter `lora_int_id` (not a registered one): its host copy goes, and an
        unheld slot holding it is emptied; a held slot keeps it until its requests finish.
        False if it is not loaded."""
        with self._lock:
            key = self.ids.get(lora_int_id)
            if key is None or key in self.pinned:
                return False
            del self.ids[lora_int_id]
            self.loaded.pop(key, None)
            for slot, held in enumerate(self.slot_key):
                if held == key and self.slot_users[slot] == 0:
                    self.slot_key[slot] = None
            return True

    def register(self, request: LoRARequest, adapter: LoRAAdapter) -> None:
        """Keep an adapter built by the model (its checkpoint's own) under `request`; it is
        never dropped from the host."""
        with self._lock:
            self.ids[request.lora_int_id] = request.cache_key
            self.loaded[request.cache_key] = adapter
            self.pinned.add(request.cache_key)

    def can_acquire(self, req) -> bool:
        """Whether `acquire(req)` would find a slot now."""
        request = req.lora_request
        if request is None or request.cache_key in self.slot_key:
            return True
        return any(users == 0 for users in self.slot_users)

    def acquire(self, req) -> bool:
        """Give an admitted request's adapter a slot (loading its weights into the layers if it
        is not there yet); False when every slot is held by other adapters."""
        request = req.lora_request
        if request is None:
            req.lora_slot = -1
            return True
        key = request.cache_key
        if key in self.slot_key:
            slot = self.slot_key.index(key)
        else:
            free = [s for s in self.slot_order if self.slot_users[s] == 0]
            if not free:
                return False
            empty = [s for s in free if self.slot_key[s] is None]
            slot = (empty or free)[0]
            adapter = self.load(request)
            for name, layer in self.layers.items():
                layer.method.set_slot(layer, slot, adapter.weights.get(name))
            self.slot_key[slot] = key
        self.slot_users[slot] += 1
        if slot in self.slot_order:
            self.slot_order.remove(slot)
        self.slot_order.append(slot)  # most recently used last
        req.lora_slot = slot
        return True

    def release(self, req) -> None:
        """A request left the running set (finished, aborted, preempted): unhold its slot."""
        slot = getattr(req, "lora_slot", -1)
        if slot >= 0:
            self.slot_users[slot] -= 1
            req.lora_slot = -1

    def set_step(self, requests, num_new_tokens) -> None:
        """Fill the step's token -> slot mapping (the runner calls it before each forward)."""
        self.batch.set_step([(r.lora_slot, n) for r, n in zip(requests, num_new_tokens)])
