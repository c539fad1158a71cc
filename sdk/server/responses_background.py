"""Background responses (OpenAI's `background: true`, served with the response store): the
POST answers at once with the response `queued`; the engine runs it as any other request, and
`GET /v1/responses/{id}` shows it `in_progress`, then `completed` (or `incomplete`, `failed`)
with its output. `POST /v1/responses/{id}/cancel` aborts a running one (its KV blocks freed):
it is stored `cancelled`. Not streamed (`stream: true` with `background` is refused)."""

from __future__ import annotations

import asyncio
from typing import Any

from polymodal.server.errors import RequestError


class BackgroundResponses:
    """The running background responses of one server: response id -> (task, engine id)."""

    def __init__(self, engine, store):
        self.engine, self.store = engine, store
        self.running: dict[str, list] = {}

    def start(self, builder, prompt: Any, params: Any, items: list) -> dict[str, Any]:
        """Queue the request; returns the `queued` response (stored as such until it runs)."""
        queued = builder.status_only("queued").model_dump()
        self.store.put(queued, items)
        entry = [None, None]
        self.running[builder.id] = entry
        entry[0] = asyncio.create_task(self._run(builder, prompt, params, items, entry))
        return queued

    async def _run(self, builder, prompt, params, items, entry) -> None:
        final = None
        try:
            entry[1] = self.engine.submit(prompt, params)
            async for out in self.engine.stream(entry[1]):
                if final is None:
                    self.store.put(builder.status_only("in_progress").model_dump(), items)
                final = out
            if final is not None and final.finished:
                builder.full([final])  # stored by the builder's on_done
            else:  # aborted: cancelled
                self.store.put(builder.status_only("cancelled").model_dump(), items)
        except Exception as exc:  # noqa: BLE001 - the response records why it failed
            failed = builder.status_only("failed").model_dump()
            failed["error"] = {"code": "server_error", "message": f"{type(exc).__name__}: {exc}"}
            self.store.put(failed, items)
        finally:
            self.running.pop(builder.id, None)

    def cancel(self, response_id: str) -> dict[str, Any]:
        """Abort a running background response; its stored state once cancelled."""
        entry = self.running.get(response_id)
        found = self.store.get(response_id)
        if found is None:
            raise RequestError(f"no stored response {response_id!r}", "response_id",
                               "not_found", 404)  # fmt: skip
        if entry is None:
            raise RequestError(
                f"response {response_id!r} is {found[0]['status']}: only a running background "
                "response can be cancelled", "response_id",
            )  # fmt: skip
        if entry[1] is not None:
            self.engine.abort(entry[1])
        response = dict(found[0], status="cancelled")
        self.store.put(response, found[1])
        return response
