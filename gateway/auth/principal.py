from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. The same shape whether it came from an API key or a JWT."""

    subject: str
    tenant: str = "default"
    # "api_key" | "jwt" | "anonymous"
    kind: str = "api_key"
    # API key id (never the key) or the token's issuer; safe to log.
    key_id: str | None = None
    # Models the caller may use; "*" means all.
    models: frozenset[str] = field(default_factory=lambda: frozenset({"*"}))
    scopes: frozenset[str] = field(default_factory=frozenset)

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


ANONYMOUS = Principal(subject="anonymous", tenant="default", kind="anonymous", key_id=None)
