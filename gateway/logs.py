"""JSON-lines logging with the request id. Never logs secrets, tokens or prompt text."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time
from typing import Any

import msgspec

_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
_ENCODER = msgspec.json.Encoder(enc_hook=str)
_second: list[Any] = [None, ""]


def _ts(created: float, msecs: float) -> str:
    sec = int(created)
    if _second[0] != sec:  # the date-time part changes once a second: formatted once
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int(msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": _ts(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and k[0] != "_":
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return _ENCODER.encode(out).decode()
        except (TypeError, ValueError, OverflowError):  # what msgspec refuses (a lone surrogate, ...)
            return json.dumps(out, default=str, ensure_ascii=True)


def line(level: str, logger: str, msg: str, fields: dict[str, Any]) -> bytes:
    """The line :class:`JsonFormatter` writes for such a record (``fields`` = the record's extras), encoded."""
    now = time.time()
    out = {"ts": _ts(now, (now - int(now)) * 1000.0), "level": level, "logger": logger, "msg": msg}
    out.update(fields)
    try:
        return _ENCODER.encode(out)
    except (TypeError, ValueError, OverflowError):
        return json.dumps(out, default=str, ensure_ascii=True).encode()


def _utf8(stream: Any) -> bool:
    return str(getattr(stream, "encoding", "")).lower().replace("-", "").replace("_", "") == "utf8"


# The handler configure() installed on the root logger (None until it ran).
_HANDLER: list[logging.StreamHandler[Any] | None] = [None]


class BatchedLines:
    """Lines that go straight to the handler :func:`configure` installed, written once per event-loop turn.

    For a logger that would reach exactly that handler and nothing else (it propagates to a root logger
    whose only handler is ours, with no handler or filter of its own): the per-request access log then
    costs one encode instead of a LogRecord, the handler chain and a write + flush per line. Anything
    else (tests capturing logs, a handler added by an embedding application) gets None from
    :meth:`target` and logs the usual way."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.pending: list[bytes] = []
        self.scheduled = False
        atexit.register(self.flush)

    def target(self) -> logging.StreamHandler[Any] | None:
        h = _HANDLER[0]
        lg = self.logger
        if h is None or lg.handlers or lg.filters or not lg.propagate:
            return None
        root = logging.root
        if len(root.handlers) != 1 or root.handlers[0] is not h or root.filters or h.filters:
            return None
        return h

    def write_line(self, level: str, logger: str, msg: str, fields: dict[str, Any]) -> None:
        """Queue the :func:`line` of these, written with the others of this event-loop turn."""
        self.pending.append(line(level, logger, msg, fields))
        if not self.scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self.scheduled = True
            except RuntimeError:  # no event loop: at once
                self.flush()

    def flush(self) -> None:
        self.scheduled = False
        if not self.pending:
            return
        lines, self.pending = self.pending, []
        h = _HANDLER[0]
        if h is None:
            return
        h.acquire()
        try:
            data = b"\n".join(lines) + b"\n"
            stream = h.stream
            buf = getattr(stream, "buffer", None)
            if buf is not None and _utf8(stream):  # a UTF-8 text stream over bytes (stderr): its text first
                stream.flush()
                buf.write(data)
                buf.flush()
            else:
                stream.write(data.decode())
                stream.flush()
        except (OSError, ValueError):  # stderr closed: as logging does, never fail the request for it
            pass
        finally:
            h.release()


def configure(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    _HANDLER[0] = h
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level.upper())
    # uvicorn's access log would duplicate ours (and knows no request id).
    logging.getLogger("uvicorn.access").disabled = True
    # The lines never show the caller's file/line, thread or process: don't look them up for every record
    # (the access log makes one per request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
