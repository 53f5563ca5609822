"""The proxied routes: the OpenAI ones pass through; ``/generate`` is the seed's simple API on completions."""

from __future__ import annotations

from typing import Any

from gateway.errors import ApiError
from gateway.routes import PROXIED_ROUTES as OPENAI_ROUTES
from gateway.routes import RouteSpec
from gateway.settings import GatewaySettings


def generate_request(body: dict[str, Any], settings: GatewaySettings) -> dict[str, Any]:
    """The seed's ``POST /generate {"prompt", "max_tokens"}`` as a completions request."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string.", param="prompt", code="invalid_type")
    model = body.get("model")
    if model is None:
        if not settings.models:
            raise ApiError(404, "No model is configured.", code="model_not_found")
        model = settings.models[0].name
    out: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": body.get("max_tokens", 128),
        "stream": False,
    }
    for k in ("temperature", "top_p", "stop", "seed"):
        if k in body:
            out[k] = body[k]
    return out


def generate_response(obj: dict[str, Any]) -> dict[str, Any]:
    choices = obj.get("choices") or [{}]
    return {"response": choices[0].get("text", ""), "model": obj.get("model"), "usage": obj.get("usage")}


GENERATE = RouteSpec(
    "/v1/completions",
    "/generate",
    streamable=False,
    request_transform=generate_request,
    response_transform=generate_response,
    text_fields=("prompt",),
    feature="generate",
)

# (public path, spec): every OpenAI route of gateway/routes.py, then the seed's /generate.
PROXIED_ROUTES: tuple[tuple[str, RouteSpec], ...] = (
    *((spec.public_path, spec) for spec in OPENAI_ROUTES),
    ("/generate", GENERATE),
)
