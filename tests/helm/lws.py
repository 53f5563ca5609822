"""The LeaderWorkerSet CRD's OpenAPI schema (tests/data/crds), applied strictly: like kubernetes-validate --strict,
a field the schema does not declare is an error (the API server would silently prune it)."""

from __future__ import annotations

import functools
import gzip
from typing import Any

import jsonschema
import yaml

from tests.support import REPO

CRD_FILE = REPO / "tests" / "data" / "crds" / "leaderworkerset.x-k8s.io_leaderworkersets-v0.10.0.yaml.gz"
API_VERSION = "leaderworkerset.x-k8s.io/v1"


def _strict(schema: Any) -> Any:
    """additionalProperties: false wherever properties are declared and unknown fields are not preserved."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(gzip.decompress(CRD_FILE.read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server itself (ObjectMeta), not by the CRD.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def validate_lws(obj: dict[str, Any]) -> None:
    """AssertionError naming the path of the first problem."""
    errors = sorted(_validator().iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path)
        raise AssertionError(f"LeaderWorkerSet {obj['metadata']['name']} invalid at {path}: {e.message}")
