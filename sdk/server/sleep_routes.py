"""Engine control routes. Sleep mode's (vLLM's, served with `--enable-sleep-mode`): `POST
/sleep?level=1|2`, `POST /wake_up` (`?tags=weights`, `?tags=kv_cache`, none: both), `GET
/is_sleeping`; a refused call (requests still running, a bad level or tag) is a 400 naming why,
and requests sent while the engine sleeps fail with a 400 saying so (llm_core/sleep.py says
what they free). The profiler's (vLLM's, served when `VLLM_TORCH_PROFILER_DIR` is set): `POST
/start_profile`, `POST /stop_profile` (`{"path"}` of the trace written; llm_core/profiler.py).
Each runs on the engine thread between steps."""

from __future__ import annotations

from fastapi import APIRouter, Query

from polymodal.async_engine import AsyncEngine


def add_sleep_routes(router: APIRouter, engine: AsyncEngine) -> None:
    @router.post("/sleep")
    async def sleep(level: int = 1):
        await engine.control("sleep", level)
        return {}

    @router.post("/wake_up")
    async def wake_up(tags: list[str] | None = Query(None)):  # noqa: B008 - FastAPI's form
        await engine.control("wake_up", tags)
        return {}

    @router.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": await engine.control("is_sleeping")}


def add_profile_routes(router: APIRouter, engine: AsyncEngine) -> None:
    @router.post("/start_profile")
    async def start_profile():
        await engine.control("start_profile")
        return {}

    @router.post("/stop_profile")
    async def stop_profile():
        return {"path": await engine.control("stop_profile")}
