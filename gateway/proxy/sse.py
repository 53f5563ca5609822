"""Server-sent events as bytes: pure functions, no I/O, no request state.

Events are separated by a blank line (``\\n\\n``, what vLLM and OpenAI send). The relay forwards complete
events only and keeps a partial trailing event for the next read. Of all the events it relays the gateway
reads one: the usage chunk, found by a cheap byte test and then parsed as JSON, so ``"usage": {`` and
``"usage":{``, ``data: {`` and ``data:{`` are all understood.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.proxy.shapes import USAGE_CHUNK

DONE = b"data: [DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
_SEP = b"\n\n"
USAGE_KEY = b'"usage"'
_USAGE_TAIL = re.compile(rb"\s*:\s*\{")


@dataclass(slots=True, init=False)
class Usage:
    """Token counts an engine reported (``None`` where it reported nothing usable)."""

    prompt_tokens: int | None
    completion_tokens: int | None

    # Written out (init=False): a generated __init__ would run as interpreted code in a compiled module.
    def __init__(self, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


def usage_of(obj: Any) -> Usage | None:
    """The usage in a response object's ``usage`` field (embeddings report no completion tokens)."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    return _counts(usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens"))


def split_complete(buf: bytes) -> tuple[bytes, bytes]:
    """(complete events, partial rest) of a buffer."""
    cut = buf.rfind(_SEP)
    if cut < 0:
        return b"", buf
    return buf[: cut + 2], buf[cut + 2 :]


def has_complete_event(buf: bytes) -> bool:
    return _SEP in buf


def _data_of(event: bytes) -> bytes | None:
    """The data of one event (its ``data:`` lines joined), or None if it has none."""
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def _counts(pt: Any, ct: Any, total: Any) -> Usage:
    """The three counts of a usage object as a :class:`Usage` (embeddings report no completion tokens)."""
    prompt = pt if isinstance(pt, int) else None
    if isinstance(ct, int):
        return Usage(prompt, ct)
    if prompt is not None and isinstance(total, int):
        return Usage(prompt, total - prompt)
    return Usage(prompt, None)


def _usage_event(event: bytes) -> tuple[Usage | None, bool]:
    """(usage, is the usage-only chunk) of one event that may hold usage."""
    if event.startswith(b"data: ") and event.find(b"\n") >= len(event) - 2:
        data: bytes | None = event[6:].rstrip(b"\n")  # the usual shape: one data line
    else:
        data = _data_of(event)
    if data is None or not data.lstrip().startswith(b"{"):
        return None, False
    try:
        chunk = USAGE_CHUNK.decode(data)
    except msgspec.DecodeError:
        # What the strict decoder refuses (NaN, a lone surrogate, a usage that is not an object) may still be
        # JSON: read it the general way.
        try:
            obj = json.loads(data)
        except ValueError:
            return None, False
        return usage_of(obj), isinstance(obj, dict) and obj.get("choices") == []
    u = chunk.usage
    if u is None:
        return None, chunk.choices == []
    return _counts(u.prompt_tokens, u.completion_tokens, u.total_tokens), chunk.choices == []


def take_usage(events: bytes, hide: bool) -> tuple[bytes, Usage | None]:
    """Read the usage out of complete events; drop the usage-only chunk (``"choices":[]``) when ``hide``.

    Returns the events to relay (byte-identical but for a dropped event) and the last usage in them. Only the
    last event holding a ``"usage": {...}`` is read (searched from the end, where the usage chunk comes): an
    earlier one (an engine's per-chunk usage stats) is superseded by it, and a stream has one usage-only
    chunk at most, its last."""
    end = len(events)
    while True:
        i = events.rfind(USAGE_KEY, 0, end)
        if i < 0:
            return events, None
        end = i
        if _USAGE_TAIL.match(events, i + len(USAGE_KEY)) is None:
            continue  # "usage": null, or the word inside a string: look further back
        start = events.rfind(_SEP, 0, i)
        start = 0 if start < 0 else start + 2
        stop = events.find(_SEP, i)
        stop = len(events) if stop < 0 else stop + 2
        found, usage_only = _usage_event(events[start:stop])
        if found is None:
            end = start  # not an event we can read: the one before may be
            continue
        if hide and usage_only:
            return events[:start] + events[stop:], found
        return events, found


def ends_with_done(data: bytes) -> bool:
    return data.rstrip().endswith(DONE)


def is_event_stream(status: int, content_type: str) -> bool:
    return status == 200 and content_type.startswith("text/event-stream")
