"""Sleep mode's routes (vLLM's, served with `--enable-sleep-mode`): `POST /sleep?level=1|2`,
`POST /wake_up` (`?tags=weights`, `?tags=kv_cache`, none: both), `GET /is_sleeping`. Each runs
on the engine thread between steps (llm_core/sleep.py says what they free); a refused call
(requests still running, a bad level or tag) is a 400 naming why. Requests sent while the
engine sleeps fail with a 400 saying so."""

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
