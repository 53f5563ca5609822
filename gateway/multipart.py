"""Reading the small text fields of a ``multipart/form-data`` body (the audio routes' ``model``, ``prompt``...)
without copying the file parts: the body is forwarded to the engine as it came."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import ApiError

# Text fields longer than this are not read (a prompt is short; a file sent as a plain field is not text).
MAX_FIELD_BYTES = 64 * 1024


@dataclass(slots=True)
class FormSummary:
    """The text fields of a form (first value of each name) and the names of its file parts."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # field name -> size in bytes


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; 400 naming what is wrong otherwise."""
    main, _, params = content_type.partition(";")
    if main.strip().lower() != "multipart/form-data":
        raise ApiError(
            400,
            f"This endpoint takes multipart/form-data (a file upload), not {main.strip() or 'a body without content type'}.",
            code="invalid_content_type",
        )
    for p in params.split(";"):
        k, _, v = p.strip().partition("=")
        if k.strip().lower() == "boundary" and v.strip():
            b = v.strip().strip('"')
            if 0 < len(b) <= 200:
                return b.encode("latin-1")
    raise ApiError(
        400, "The multipart/form-data content type has no valid boundary.", code="invalid_content_type"
    )


def _disposition(headers: bytes) -> tuple[str | None, bool]:
    """(field name, is a file) from a part's headers."""
    for line in headers.split(b"\r\n"):
        k, _, v = line.partition(b":")
        if k.strip().lower() != b"content-disposition":
            continue
        name, is_file = None, False
        for item in v.decode("utf-8", "replace").split(";"):
            pk, _, pv = item.strip().partition("=")
            pk = pk.strip().lower()
            if pk == "name":
                name = pv.strip().strip('"')
            elif pk == "filename" or pk == "filename*":
                is_file = True
        return name, is_file
    return None, False


def parse_form(body: bytes, content_type: str) -> FormSummary:
    """Summarize a multipart body. Malformed bodies get a 400 that says so."""
    delim = b"--" + boundary_of(content_type)
    out = FormSummary()
    start = body.find(delim)
    if start < 0:
        raise ApiError(400, "The multipart body does not contain its boundary.", code="invalid_multipart")
    pos = start + len(delim)
    while True:
        if body.startswith(b"--", pos):
            return out  # closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise ApiError(400, "The multipart body is malformed.", code="invalid_multipart")
        pos += 2
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise ApiError(
                400, "The multipart body is malformed (a part has no header end).", code="invalid_multipart"
            )
        name, is_file = _disposition(body[pos:head_end])
        data_start = head_end + 4
        nxt = body.find(b"\r\n" + delim, data_start)
        if nxt < 0:
            raise ApiError(
                400, "The multipart body is truncated (no closing boundary).", code="invalid_multipart"
            )
        if name is not None:
            size = nxt - data_start
            if is_file:
                out.files.setdefault(name, size)
            elif name not in out.fields and size <= MAX_FIELD_BYTES:
                out.fields[name] = body[data_start:nxt].decode("utf-8", "replace")
        pos = nxt + 2 + len(delim)
