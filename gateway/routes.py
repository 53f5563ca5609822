"""The OpenAI surface the gateway serves, as data: one ``RouteSpec`` per route.

Every proxied route goes through the same request path (authenticate → authorize the model → admit →
route → forward → settle → audit → metrics); what differs between routes is only what this table says:

- where the model name is (``model_from``): the JSON body's ``model``, a multipart form field ``model``, or,
  for routes about an object an engine holds (``GET /v1/responses/{id}``), the replica that created it
  (affinity by id: the gateway remembers which model and replica answered a response id);
- how usage is read from the answer (``usage``) and whether its tokens count as generation for quotas;
- which request fields carry text for the audit content policy (``text_fields``);
- which engine feature serves it (``feature``): a route is advertised and forwarded only to engines whose
  OpenAPI document lists its path (probed with the health checks), so nothing an engine lacks is offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ModelFrom = Literal["json", "form", "affinity"]
# chat: prompt_tokens/completion_tokens (chat, completions; streamed: the usage-only chunk)
# responses: input_tokens/output_tokens (streamed: the ``response.completed`` event)
# prompt_only: prompt_tokens/total_tokens, no completion (embeddings, pooling, score, rerank)
# none: nothing to settle (tokenize/detokenize, retrieval of a stored response, cancel)
UsageKind = Literal["chat", "responses", "prompt_only", "none"]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One OpenAI-compatible route as the gateway serves it."""

    # The path clients call (Starlette pattern, e.g. ``/v1/responses/{response_id}``).
    path: str
    # The engine's path for it; ``{name}`` placeholders are filled from the path parameters.
    upstream_path: str
    # A bounded name for metrics and audit (the path pattern, never a concrete id).
    name: str
    methods: tuple[str, ...] = ("POST",)
    model_from: ModelFrom = "json"
    # The path parameter that names the stored object (model_from="affinity").
    affinity_param: str | None = None
    streamable: bool = False
    usage: UsageKind = "chat"
    # Whether the route's tokens are reserved and settled as generation tokens in quotas.
    counts_tokens: bool = True
    # Request fields whose text the audit content policy covers (hash / redacted), in order.
    text_fields: tuple[str, ...] = ()
    # The engine feature the route needs (README table; ``engine_path`` is what an engine must list).
    feature: str = ""
    # Body size limit setting (a GatewaySettings attribute), when it is not the general one.
    body_limit_setting: str | None = None
    # A route whose answer creates an object later calls find by id (affinity is recorded from it).
    records_affinity: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def engine_path(self) -> str:
        """The path as the engine's OpenAPI document lists it (``/v1/responses/{response_id}``)."""
        return self.upstream_path

    def upstream_url_path(self, params: dict[str, str]) -> str:
        p = self.upstream_path
        for k, v in params.items():
            p = p.replace("{" + k + "}", v)
        return p


CHAT = RouteSpec(
    "/v1/chat/completions",
    "/v1/chat/completions",
    "/v1/chat/completions",
    streamable=True,
    text_fields=("messages",),
    feature="generate",
)
COMPLETIONS = RouteSpec(
    "/v1/completions",
    "/v1/completions",
    "/v1/completions",
    streamable=True,
    text_fields=("prompt",),
    feature="generate",
)
RESPONSES = RouteSpec(
    "/v1/responses",
    "/v1/responses",
    "/v1/responses",
    streamable=True,
    usage="responses",
    text_fields=("instructions", "input"),
    feature="generate (Responses API)",
    records_affinity=True,
)
RESPONSES_GET = RouteSpec(
    "/v1/responses/{response_id}",
    "/v1/responses/{response_id}",
    "/v1/responses/{id}",
    methods=("GET",),
    model_from="affinity",
    affinity_param="response_id",
    usage="none",
    counts_tokens=False,
    feature="generate (Responses API, response store)",
)
RESPONSES_CANCEL = RouteSpec(
    "/v1/responses/{response_id}/cancel",
    "/v1/responses/{response_id}/cancel",
    "/v1/responses/{id}/cancel",
    model_from="affinity",
    affinity_param="response_id",
    usage="none",
    counts_tokens=False,
    feature="generate (Responses API, response store)",
)
EMBEDDINGS = RouteSpec(
    "/v1/embeddings",
    "/v1/embeddings",
    "/v1/embeddings",
    usage="prompt_only",
    text_fields=("input",),
    feature="embed (pooling runner)",
)
SCORE = RouteSpec(
    "/v1/score",
    "/v1/score",
    "/v1/score",
    usage="prompt_only",
    text_fields=("text_1", "text_2", "queries", "documents"),
    feature="score (pooling runner: cross-encoder or embedding model)",
)
RERANK = RouteSpec(
    "/v1/rerank",
    "/v1/rerank",
    "/v1/rerank",
    usage="prompt_only",
    text_fields=("query", "documents"),
    feature="score (pooling runner: cross-encoder or embedding model)",
)
RERANK_ALIAS = RouteSpec(
    "/rerank",
    "/rerank",
    "/rerank",
    usage="prompt_only",
    text_fields=("query", "documents"),
    feature="score (pooling runner: cross-encoder or embedding model)",
)
TOKENIZE = RouteSpec(
    "/tokenize",
    "/tokenize",
    "/tokenize",
    usage="none",
    counts_tokens=False,
    text_fields=("messages", "prompt"),
    feature="any model with a tokenizer",
)
DETOKENIZE = RouteSpec(
    "/detokenize",
    "/detokenize",
    "/detokenize",
    usage="none",
    counts_tokens=False,
    feature="any model with a tokenizer",
)
TRANSCRIPTIONS = RouteSpec(
    "/v1/audio/transcriptions",
    "/v1/audio/transcriptions",
    "/v1/audio/transcriptions",
    model_from="form",
    streamable=True,
    usage="chat",
    text_fields=("prompt",),
    feature="transcription (a speech model, e.g. Whisper)",
    body_limit_setting="max_audio_bytes",
)
TRANSLATIONS = RouteSpec(
    "/v1/audio/translations",
    "/v1/audio/translations",
    "/v1/audio/translations",
    model_from="form",
    streamable=True,
    usage="chat",
    text_fields=("prompt",),
    feature="transcription (a speech model, e.g. Whisper)",
    body_limit_setting="max_audio_bytes",
)

# Every proxied route, in the order the app mounts them (more specific paths first).
PROXIED_ROUTES: tuple[RouteSpec, ...] = (
    CHAT,
    COMPLETIONS,
    RESPONSES_CANCEL,
    RESPONSES_GET,
    RESPONSES,
    EMBEDDINGS,
    SCORE,
    RERANK,
    RERANK_ALIAS,
    TOKENIZE,
    DETOKENIZE,
    TRANSCRIPTIONS,
    TRANSLATIONS,
)

ROUTE_NAMES: frozenset[str] = frozenset(r.name for r in PROXIED_ROUTES)


def route_texts(spec: RouteSpec, body: dict[str, Any] | None) -> list[dict[str, str]]:
    """The request's text as ``[{role, content}]`` parts, from the route's ``text_fields`` (audit content
    policy). Chat messages keep their roles; other fields use the field name as the role. Non-text parts
    (images, audio, token ids) are skipped."""
    from gateway.prompt import content_text

    if not isinstance(body, dict):
        return []
    out: list[dict[str, str]] = []
    for f in spec.text_fields:
        v = body.get(f)
        if v is None:
            continue
        if f in ("messages", "input") and isinstance(v, list) and any(isinstance(m, dict) for m in v):
            for m in v:
                if not isinstance(m, dict):
                    continue
                c = content_text(m.get("content"), "\n")
                if c is None and isinstance(m.get("text"), str):
                    c = m["text"]
                if c is not None:
                    out.append({"role": str(m.get("role", m.get("type", f))), "content": c})
            continue
        _texts_of(f, v, out)
    return out


def _texts_of(role: str, v: Any, out: list[dict[str, str]]) -> None:
    if isinstance(v, str):
        out.append({"role": role, "content": v})
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, str):
                out.append({"role": role, "content": x})
            elif isinstance(x, dict) and isinstance(x.get("text"), str):
                out.append({"role": role, "content": x["text"]})
    elif isinstance(v, dict) and isinstance(v.get("text"), str):
        out.append({"role": role, "content": v["text"]})


def usage_tokens(kind: UsageKind, usage: Any) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) from a usage object of the route's kind; (None, None) if absent."""
    if kind == "none" or not isinstance(usage, dict):
        return None, None
    if kind == "responses":
        it, ot = usage.get("input_tokens"), usage.get("output_tokens")
        return (it if isinstance(it, int) else None), (ot if isinstance(ot, int) else None)
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    pt = pt if isinstance(pt, int) else None
    if kind == "prompt_only":
        if pt is None and isinstance(usage.get("total_tokens"), int):
            pt = usage["total_tokens"]
        return pt, 0 if pt is not None else None
    if not isinstance(ct, int):
        ct = (
            usage["total_tokens"] - pt
            if pt is not None and isinstance(usage.get("total_tokens"), int)
            else None
        )
    return pt, ct
