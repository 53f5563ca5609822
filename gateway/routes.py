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

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

ModelFrom = Literal["json", "form", "affinity"]
# chat: prompt_tokens/completion_tokens (chat, completions; streamed: the usage-only chunk)
# responses: input_tokens/output_tokens (streamed: the ``response.completed`` event)
# prompt_only: prompt_tokens/total_tokens, no completion (embeddings, pooling, score, rerank)
# none: nothing to settle (tokenize/detokenize, retrieval of a stored response, cancel)
UsageKind = Literal["chat", "responses", "prompt_only", "none"]
RequestTransform = Callable[[dict[str, Any], Any], dict[str, Any]]
ResponseTransform = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One OpenAI-compatible route as the gateway serves it."""

    # The engine's path (``{name}`` placeholders are filled from the path parameters), and the bounded name
    # used in metrics and audit (the path pattern, never a concrete id).
    upstream_path: str
    route_name: str
    streamable: bool = True
    request_transform: RequestTransform | None = None
    response_transform: ResponseTransform | None = None
    # The path clients call (Starlette pattern); defaults to ``route_name``.
    path: str = ""
    methods: tuple[str, ...] = ("POST",)
    model_from: ModelFrom = "json"
    # The path parameter that names the stored object (model_from="affinity").
    affinity_param: str | None = None
    usage: UsageKind = "chat"
    # Request fields whose text the audit content policy covers (hash / redacted), in order.
    text_fields: tuple[str, ...] = ()
    # The engine feature the route needs (the README's table).
    feature: str = ""
    # A GatewaySettings attribute holding this route's body size limit, when not the general one.
    body_limit_setting: str | None = None
    # The answer creates an object that later calls name by id (its replica is remembered).
    records_affinity: bool = False

    @property
    def public_path(self) -> str:
        return self.path or self.route_name

    @property
    def reserves_completion(self) -> bool:
        """Whether quotas reserve completion tokens (max_tokens or the default) at admission."""
        return self.usage in ("chat", "responses")

    @property
    def counts_tokens(self) -> bool:
        """Whether the route's tokens count against token quotas at all (tokenize/detokenize do not)."""
        return self.usage != "none"

    @property
    def forces_stream_usage(self) -> bool:
        """Streams of this route ask the engine for the usage chunk (``stream_options.include_usage``)."""
        return self.usage == "chat" and self.model_from == "json"

    def upstream_url_path(self, params: dict[str, str]) -> str:
        p = self.upstream_path
        for k, v in params.items():
            p = p.replace("{" + k + "}", v)
        return p


_SCORE = "score (pooling runner: a cross-encoder, or an embedding model as a bi-encoder)"
_STORE = "generate + Responses store (ENGINE_RESPONSES_STORE)"
_SPEECH = "transcription (a speech model, e.g. Whisper)"

def _at(path: str, spec: RouteSpec) -> RouteSpec:
    """The same route served at another path (an alias, or a sibling that differs only in its path)."""
    return replace(spec, upstream_path=path, route_name=path, path="")


CHAT = RouteSpec(
    "/v1/chat/completions",
    "/v1/chat/completions",
    streamable=True,
    text_fields=("messages",),
    feature="generate",
)
COMPLETIONS = RouteSpec(
    "/v1/completions", "/v1/completions", streamable=True, text_fields=("prompt",), feature="generate"
)
RESPONSES = RouteSpec(
    "/v1/responses",
    "/v1/responses",
    streamable=True,
    usage="responses",
    text_fields=("instructions", "input"),
    feature="generate",
    records_affinity=True,
)
RESPONSES_GET = RouteSpec(
    "/v1/responses/{response_id}",
    "/v1/responses/{id}",
    path="/v1/responses/{response_id}",
    streamable=False,
    methods=("GET",),
    model_from="affinity",
    affinity_param="response_id",
    usage="none",
    feature=_STORE,
)
RESPONSES_CANCEL = RouteSpec(
    "/v1/responses/{response_id}/cancel",
    "/v1/responses/{id}/cancel",
    path="/v1/responses/{response_id}/cancel",
    streamable=False,
    model_from="affinity",
    affinity_param="response_id",
    usage="none",
    feature=_STORE,
)
EMBEDDINGS = RouteSpec(
    "/v1/embeddings",
    "/v1/embeddings",
    streamable=False,
    usage="prompt_only",
    text_fields=("input",),
    feature="embed (pooling runner)",
)
SCORE = RouteSpec(
    "/v1/score",
    "/v1/score",
    streamable=False,
    usage="prompt_only",
    text_fields=("text_1", "text_2", "queries", "documents"),
    feature=_SCORE,
)
SCORE_ALIAS = _at("/score", SCORE)
RERANK = RouteSpec(
    "/v1/rerank",
    "/v1/rerank",
    streamable=False,
    usage="prompt_only",
    text_fields=("query", "documents"),
    feature=_SCORE,
)
RERANK_ALIAS = _at("/rerank", RERANK)
RERANK_V2 = _at("/v2/rerank", RERANK)
TOKENIZE = RouteSpec(
    "/tokenize",
    "/tokenize",
    streamable=False,
    usage="none",
    text_fields=("messages", "prompt"),
    feature="any model",
)
DETOKENIZE = RouteSpec("/detokenize", "/detokenize", streamable=False, usage="none", feature="any model")
TRANSCRIPTIONS = RouteSpec(
    "/v1/audio/transcriptions",
    "/v1/audio/transcriptions",
    model_from="form",
    streamable=True,
    usage="chat",
    text_fields=("prompt",),
    feature=_SPEECH,
    body_limit_setting="max_audio_bytes",
)
TRANSLATIONS = _at("/v1/audio/translations", TRANSCRIPTIONS)

# Every proxied route, in the order the app mounts them (more specific paths first).
PROXIED_ROUTES: tuple[RouteSpec, ...] = (
    CHAT,
    COMPLETIONS,
    RESPONSES_CANCEL,
    RESPONSES_GET,
    RESPONSES,
    EMBEDDINGS,
    SCORE,
    SCORE_ALIAS,
    RERANK,
    RERANK_ALIAS,
    RERANK_V2,
    TOKENIZE,
    DETOKENIZE,
    TRANSCRIPTIONS,
    TRANSLATIONS,
)

ROUTES_BY_NAME: dict[str, RouteSpec] = {r.route_name: r for r in PROXIED_ROUTES}


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
