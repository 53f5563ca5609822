"""Prefix affinity: send requests that share a long prompt prefix to the replica that already caches it.

The key is a hash of the prompt's first ``prefix_chars`` characters (chat messages as ``role:content``
lines). Requests sharing a system prompt at least that long, or turns of one conversation, get one key; a
prompt shorter than that gets none (its prefill is cheap) and is placed by load alone. A session header,
when present, is the key instead.

Keys map onto a consistent-hash ring of replicas (``virtual_nodes`` points each), so adding or removing a
replica moves only its share of keys. Bounded load (Mirrokni, Thorup, Zadimoghaddam: "Consistent Hashing
with Bounded Loads"): walking the ring from the key, a replica is taken only if its load with this request
stays within ceil(load_factor x mean load); a hot prefix therefore spills over to the next replica on the
ring instead of piling onto one.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from gateway.prompt import CHARS_PER_TOKEN_ID, content_text


class _Loaded(Protocol):
    url: str

    @property
    def load(self) -> int: ...


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prompt_prefix(body: dict[str, Any] | None, limit: int) -> str | None:
    """The first ``limit`` characters of the prompt, or None when the prompt is shorter than that."""
    if not body:
        return None
    parts: list[str] = []
    n = 0
    msgs = body.get("messages")
    if isinstance(msgs, list):
        for m in msgs:
            if not isinstance(m, dict):
                continue
            c = content_text(m.get("content"))
            if c is None:
                continue
            piece = f"{m.get('role', '')}:{c}\n"
            parts.append(piece)
            n += len(piece)
            if n >= limit:
                break
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        if isinstance(p, str):
            parts.append(p)
            n = len(p)
        elif (
            isinstance(p, list)
            and p
            and all(isinstance(t, int) for t in p[: limit // CHARS_PER_TOKEN_ID + 1])
        ):
            # Token ids: each counts as CHARS_PER_TOKEN_ID characters.
            toks = p[: limit // CHARS_PER_TOKEN_ID]
            if len(toks) * CHARS_PER_TOKEN_ID < limit:
                return None
            return ",".join(map(str, toks))
    if n < limit:
        return None
    return "".join(parts)[:limit]


def affinity_key(body: dict[str, Any] | None, prefix_chars: int, session: str | None = None) -> int | None:
    """The ring position of a request: from the session id if given, else from the prompt prefix."""
    if session:
        return _h64(b"s:" + session.encode("utf-8", "replace"))
    prefix = prompt_prefix(body, prefix_chars)
    if prefix is None:
        return None
    return _h64(b"p:" + prefix.encode("utf-8", "replace"))


class HashRing:
    """Consistent-hash ring over replica URLs; rebuilt only when the set of URLs changes."""

    def __init__(self, urls: Sequence[str], virtual_nodes: int = 64) -> None:
        self.urls = frozenset(urls)
        points = sorted((_h64(f"{u}#{i}".encode()), u) for u in self.urls for i in range(virtual_nodes))
        self._keys = [p for p, _ in points]
        self._urls = [u for _, u in points]

    def walk(self, key: int) -> Iterator[str]:
        """Distinct URLs in ring order starting at ``key``."""
        if not self._keys:
            return
        seen: set[str] = set()
        n = len(self._keys)
        i = bisect.bisect_left(self._keys, key)
        for j in range(n):
            u = self._urls[(i + j) % n]
            if u not in seen:
                seen.add(u)
                yield u
                if len(seen) == len(self.urls):
                    return


def bounded_load_pick(
    ring: HashRing, key: int, candidates: Sequence[_Loaded], load_factor: float
) -> _Loaded | None:
    """The first candidate in ring order from ``key`` whose load, with this request, is within the bound.

    Candidates not on the ring are ignored; if all are over the bound (cannot happen with load_factor >= 1,
    kept for safety) the least loaded is returned.
    """
    if not candidates:
        return None
    by_url = {c.url: c for c in candidates}
    total = sum(c.load for c in candidates) + 1
    bound = math.ceil(load_factor * total / len(candidates))
    for url in ring.walk(key):
        c = by_url.get(url)
        if c is not None and c.load + 1 <= bound:
            return c
    return min(candidates, key=lambda c: c.load)
