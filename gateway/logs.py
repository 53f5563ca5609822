"""JSON-lines logging with the request id. Never logs secrets, tokens or prompt text."""

from __future__ import annotations

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


def configure(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
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
