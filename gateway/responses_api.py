"""The Responses API's two gateway-side needs: where a stored response lives, and what its stream says.

A response created with ``POST /v1/responses`` is stored in the memory of the engine replica that made it
(vLLM's response store), so ``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel`` must reach that
replica. ``ResponseIndex`` remembers, per gateway process, the model, replica and caller of each response id
it saw created (bounded, oldest first out). Only the caller who created a response may read or cancel it.

Streams of the Responses API are typed SSE events (``event: response.created``, ...); they end with a
terminal event (``response.completed``, ``response.incomplete`` or ``response.failed``) that carries the
usage, and no ``[DONE]`` line.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TERMINAL_MARKERS = tuple(b'"type":"' + t.encode() + b'"' for t in TERMINAL_EVENTS)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    model: str
    endpoint: str
    principal: str | None
    created: float


class ResponseIndex:
    """response id -> where it lives and who created it; at most ``capacity`` ids, each for ``ttl`` seconds."""

    def __init__(self, capacity: int = 100_000, ttl: float = 24 * 3600.0) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def record(self, response_id: str, model: str, endpoint: str, principal: str | None) -> None:
        if not response_id or len(response_id) > 256:
            return
        self._items[response_id] = StoredResponse(model, endpoint, principal, time.time())
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def lookup(self, response_id: str) -> StoredResponse | None:
        item = self._items.get(response_id)
        if item is None:
            return None
        if time.time() - item.created > self.ttl:
            del self._items[response_id]
            return None
        return item


def response_id_of(obj: Any) -> str | None:
    """The id of a Responses API object (``{"id": "resp_..."}``) or of an event wrapping one."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("response"), dict):
        obj = obj["response"]
    rid = obj.get("id")
    return rid if isinstance(rid, str) and obj.get("object", "response") == "response" else None


@dataclass(slots=True)
class ResponsesStream:
    """What the gateway learns from a Responses API stream while relaying it unchanged."""

    response_id: str | None = None
    usage: dict[str, Any] | None = None
    terminal: str | None = None

    def feed(self, events: bytes) -> None:
        """Read complete SSE events: the id from ``response.created``, usage from the terminal event. Only the
        events that can carry them are parsed (the deltas in between are not)."""
        if self.response_id is None and b"response.created" in events:
            for data in _data_lines(events):
                if b'"response.created"' in data:
                    obj = _json(data)
                    self.response_id = response_id_of(obj)
                    break
        if any(m in events for m in _TERMINAL_MARKERS):
            for data in _data_lines(events):
                if any(m in data for m in _TERMINAL_MARKERS):
                    obj = _json(data)
                    if isinstance(obj, dict):
                        self.terminal = str(obj.get("type"))
                        resp = obj.get("response")
                        if isinstance(resp, dict) and isinstance(resp.get("usage"), dict):
                            self.usage = resp["usage"]
                        if self.response_id is None:
                            self.response_id = response_id_of(obj)


def _data_lines(events: bytes) -> list[bytes]:
    return [line[5:].strip() for line in events.split(b"\n") if line.startswith(b"data:")]


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None
