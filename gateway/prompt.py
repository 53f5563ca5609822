"""Reading the text of a chat message's ``content``: a string, or a list of parts of which the text parts count."""

from __future__ import annotations

from typing import Any

# A prompt given as token ids counts this many characters per token id (the usual ~4 characters a token).
CHARS_PER_TOKEN_ID = 4


def content_text(content: Any, sep: str = "") -> str | None:
    """The text of one message's ``content``: the string itself, or its text parts joined with ``sep``
    (image/audio parts are skipped); None when it holds no text form at all."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return None


def prompt_chars(body: dict[str, Any]) -> int:
    """A cheap size of the prompt in characters (messages' text, prompt, or input)."""
    msgs = body.get("messages")
    if isinstance(msgs, list):
        n = 0
        for m in msgs:
            if isinstance(m, dict):
                text = content_text(m.get("content"))
                if text is not None:
                    n += len(text)
        return n
    for key in ("prompt", "input"):
        p = body.get(key)
        if isinstance(p, str):
            return len(p)
        if isinstance(p, list):
            return _list_chars(p)
    return 0


def _list_chars(items: list[Any]) -> int:
    n = 0
    for x in items:
        if isinstance(x, str):
            n += len(x)
        elif isinstance(x, list):
            n += len(x) * CHARS_PER_TOKEN_ID
    return n
