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

    @property
    def id(self) -> str:
        """The caller's identity, namespaced by credential kind (and issuer): ``key:<subject>`` for an API key,
        ``jwt:<issuer>#<sub>`` for a token, ``anonymous``. A token's ``sub`` can never name an API key's
        identity (quota buckets, audit ``user.id``), nor a subject of another issuer."""
        if self.kind == "api_key":
            return "key:" + self.subject
        if self.kind == "jwt":
            return f"jwt:{self.key_id}#{self.subject}"
        return self.kind if self.subject == self.kind else f"{self.kind}:{self.subject}"

    @property
    def quota_names(self) -> tuple[str, ...]:
        """Names under which the quota config may give this caller limits, most specific first: an API key
        by its id or subject (or ``key:<...>``); a token only by its full :attr:`id`."""
        if self.kind == "api_key":
            names = [self.id]
            if self.key_id is not None:
                names += [self.key_id, "key:" + self.key_id]
            names.append(self.subject)
            return tuple(names)
        return (self.id,)

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


ANONYMOUS = Principal(subject="anonymous", tenant="default", kind="anonymous", key_id=None)
