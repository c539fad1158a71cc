"""Adapters loaded and unloaded while serving (vLLM's runtime LoRA updating, on when the
environment sets `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, as for vLLM): `POST
/v1/load_lora_adapter` `{"lora_name", "lora_path", "load_inplace": false}` reads and checks the
PEFT adapter in the engine (a bad one is a 400 naming why and serves nothing), then requests
naming `lora_name` as their model run with it and `/v1/models` lists it; `POST
/v1/unload_lora_adapter` `{"lora_name"}` stops serving it (404 if it is not served) and lets
the engine drop its host copy. Each load gets a new adapter id, so a name loaded in place
again never shares KV-cache blocks or a slot with its earlier weights."""

from __future__ import annotations

import itertools
import os

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from polymodal.async_engine import AsyncEngine
from polymodal.llm_core.lora.adapter import LoRARequest
from polymodal.server.errors import RequestError

ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updates_allowed() -> bool:
    """vLLM's switch: the environment variable set to true / 1."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true")


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None


def add_lora_routes(router: APIRouter, engine: AsyncEngine, adapters: dict, names: list) -> None:
    """`adapters`: the server's served name -> `LoRARequest` map, changed in place; `names`:
    the base model's served names (no adapter may take one)."""
    ids = itertools.count(max((a.lora_int_id for a in adapters.values()), default=0) + 1)

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        name = body.lora_name
        if not name or name in names:
            raise RequestError(f"lora_name {name!r} is empty or the base model's", "lora_name")
        if name in adapters and not body.load_inplace:
            raise RequestError(
                f"The lora adapter {name!r} has already been loaded (load_inplace: true "
                "replaces it)",
                "lora_name",
            )
        lora = LoRARequest(name, next(ids), body.lora_path)
        await engine.control("check_lora", lora)  # read and checked, or a 400
        old = adapters.get(name)
        adapters[name] = lora
        if old is not None:
            await engine.control("remove_lora", old.lora_int_id)
        return f"Success: LoRA adapter '{name}' added successfully."

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        name = body.lora_name
        lora = adapters.get(name)
        if lora is None or (body.lora_int_id not in (None, lora.lora_int_id)):
            raise RequestError(
                f"The lora adapter {name!r} cannot be found.", "lora_name", "not_found", 404
            )
        del adapters[name]
        await engine.control("remove_lora", lora.lora_int_id)
        return f"Success: LoRA adapter '{name}' removed successfully."
