"""One S3 configuration for every part of the stack that talks to object storage.

The engine (weights) and the gateway (audit archive) both build their S3 client here, from the same standard
variables, so an endpoint, a CA bundle or a credential source set once works for both. ``gateway/`` and
``engine/`` never import each other; both may import this small package (no torch, no vllm, no Starlette).
"""

from objectstore.s3 import (
    CREDENTIAL_SOURCES,
    CredentialsError,
    S3Config,
    S3ConfigError,
    config_from_env,
    describe_error,
    is_unreachable,
    make_client,
)

__all__ = [
    "CREDENTIAL_SOURCES",
    "CredentialsError",
    "S3Config",
    "S3ConfigError",
    "config_from_env",
    "describe_error",
    "is_unreachable",
    "make_client",
]
