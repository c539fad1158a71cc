"""Stored responses of the Responses API (vLLM's, on when the environment sets
`VLLM_ENABLE_RESPONSES_API_STORE=1`): a response made with `store` (OpenAI's default: true) is
kept in memory with its conversation, the input items that led to it and its output; a later
request's `previous_response_id` continues that conversation (its own `instructions` apply, not
the earlier ones), `GET /v1/responses/{id}` returns it and `DELETE /v1/responses/{id}` forgets
it. The store holds the latest `capacity` responses (the oldest dropped first): a server
restart, or enough newer responses, loses a conversation, which then answers 404."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

ENV = "VLLM_ENABLE_RESPONSES_API_STORE"


def store_enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("1", "true")


class ResponseStore:
    """Response id -> (the Response object, its conversation's input items)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[dict[str, Any], list]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: dict[str, Any], items: list) -> None:
        with self._lock:
            self._entries[response["id"]] = (response, items)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict[str, Any], list] | None:
        with self._lock:
            return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._entries.pop(response_id, None) is not None
