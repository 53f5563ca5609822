"""What each engine replica serves, learned with the health probes (never per client request).

- ``/v1/models``: the model names the engine serves (the base model and its LoRA adapters, which come and go
  at run time) with what the engine reports about them (``max_model_len``, ``created``, ``parent``);
- ``/openapi.json``: the routes the engine serves (vLLM mounts a route only for the tasks the model supports:
  ``/v1/embeddings`` only on pooling models, audio only on speech models), read once per replica start.

The gateway uses it to list models with the engine's fields and to refuse, in OpenAI's shape, a route the
model's engines do not serve, instead of advertising it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

# Refresh /v1/models this often (seconds): adapters loaded or unloaded at run time show up within it.
MODELS_REFRESH_S = 10.0
# Fields of an engine's model entry the gateway passes on (never ``root``: a path on the engine's disk).
ENGINE_MODEL_FIELDS = ("max_model_len", "created", "parent")


@dataclass(slots=True)
class EngineCatalog:
    """One replica's self-description; ``None`` fields are not known (yet)."""

    models: dict[str, dict[str, Any]] | None = None
    paths: frozenset[str] | None = None
    models_at: float = 0.0
    # Whether /openapi.json was asked for since the replica (re)started (asked once; None paths = unknown).
    paths_asked: bool = False

    def serves_model(self, name: str) -> bool | None:
        return None if self.models is None else name in self.models

    def serves_path(self, path: str) -> bool | None:
        return None if self.paths is None else path in self.paths


@dataclass(slots=True)
class CatalogView:
    """What a pool's healthy replicas serve, merged (a route or model counts when any replica serves it)."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)
    known_models: bool = False
    known_paths: bool = False

    def serves_path(self, path: str) -> bool | None:
        return (path in self.paths) if self.known_paths else None

    def serves_model(self, name: str) -> bool | None:
        return (name in self.models) if self.known_models else None


def _catalog_replicas(endpoints: list[Any]) -> list[Any]:
    """Whose catalogs speak for a pool: the healthy replicas; all of them when none is healthy."""
    return [e for e in endpoints if e.healthy] or list(endpoints)


def merged(endpoints: list[Any]) -> CatalogView:
    """The catalog of a pool (the union over ``_catalog_replicas``)."""
    view = CatalogView()
    for ep in _catalog_replicas(endpoints):
        cat: EngineCatalog | None = getattr(ep, "catalog", None)
        if cat is None:
            continue
        if cat.models is not None:
            view.known_models = True
            for name, m in cat.models.items():
                view.models.setdefault(name, m)
        if cat.paths is not None:
            view.known_paths = True
            view.paths.update(cat.paths)
    return view


def pool_serves_path(endpoints: list[Any], path: str) -> bool | None:
    """``merged(endpoints).serves_path(path)`` without building the merged view (once per request)."""
    known = False
    for ep in _catalog_replicas(endpoints):
        cat: EngineCatalog | None = getattr(ep, "catalog", None)
        if cat is None or cat.paths is None:
            continue
        if path in cat.paths:
            return True
        known = True
    return False if known else None


def _engine_fields(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ENGINE_MODEL_FIELDS if k in entry}


def parse_models(data: bytes) -> dict[str, dict[str, Any]] | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    items = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return None
    return {m["id"]: _engine_fields(m) for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)}


def parse_paths(data: bytes) -> frozenset[str] | None:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    paths = obj.get("paths") if isinstance(obj, dict) else None
    return frozenset(paths) if isinstance(paths, dict) else None


async def describe(
    session: aiohttp.ClientSession, ep: Any, api_key: str | None = None, *, force: bool = False
) -> None:
    """Refresh ``ep.catalog`` (models every ``MODELS_REFRESH_S``, paths once per replica start). Failures keep
    what was known: a catalog is a hint for listing and refusing routes, never a health signal."""
    cat: EngineCatalog | None = getattr(ep, "catalog", None)
    if cat is None:
        cat = ep.catalog = EngineCatalog()
    now = time.time()
    headers = {"authorization": "Bearer " + api_key} if api_key else None
    if force or cat.models is None or now - cat.models_at >= MODELS_REFRESH_S:
        try:
            async with session.get(ep.url + "/v1/models", headers=headers) as r:
                if r.status == 200:
                    models = parse_models(await r.read())
                    if models is not None:
                        cat.models, cat.models_at = models, now
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
    if force or not cat.paths_asked:
        try:
            async with session.get(ep.url + "/openapi.json", headers=headers) as r:
                cat.paths_asked = r.status < 500
                if r.status == 200:
                    cat.paths = parse_paths(await r.read())
                elif r.status == 404:
                    cat.paths = None  # the engine hides its OpenAPI document: every route is forwarded
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
