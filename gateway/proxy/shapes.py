"""The shapes of engine answers read for their usage alone: msgspec structs, decoded without building the rest.

msgspec reads a struct's annotations at run time, and compiled modules do not keep theirs (gateway/native.py),
so the structs live here, in a module that is never compiled.
"""

from __future__ import annotations

from typing import Any

import msgspec


class UsageOnly(msgspec.Struct):
    """A JSON object read for its ``usage`` member alone: the decoder validates the rest and skips it
    without building it (a chat answer, or an embeddings answer of thousands of floats)."""

    usage: Any = None


class UsageCounts(msgspec.Struct):
    """The counts of a ``usage`` object (other members are validated, not built)."""

    prompt_tokens: Any = None
    completion_tokens: Any = None
    total_tokens: Any = None


class UsageChunk(msgspec.Struct):
    """An event's JSON read for ``usage`` and ``choices`` only (the rest is validated, not built)."""

    usage: UsageCounts | None = None
    choices: Any = None


USAGE_ONLY = msgspec.json.Decoder(UsageOnly)
USAGE_CHUNK = msgspec.json.Decoder(UsageChunk)
