"""Reading the text of a chat message's ``content``: a string, or a list of parts of which the text parts count."""

from __future__ import annotations

from typing import Any


def content_text(content: Any, sep: str = "") -> str | None:
    """The text of one message's ``content``: the string itself, or its text parts joined with ``sep``
    (image/audio parts are skipped); None when it holds no text form at all."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return None
