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

    # Derived once (a principal is built per key or verified token, then read by every request).
    id: str = field(init=False, repr=False, compare=False)
    quota_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", self._id())
        object.__setattr__(self, "quota_names", self._quota_names())

    def _id(self) -> str:
        """The caller's identity, namespaced by credential kind (and issuer): ``key:<subject>`` for an API key,
        ``jwt:<issuer>#<sub>`` for a token, ``anonymous``. A token's ``sub`` can never name an API key's
        identity (quota buckets, audit ``user.id``), nor a subject of another issuer."""
        if self.kind == "api_key":
            return "key:" + self.subject
        if self.kind == "jwt":
            return f"jwt:{self.key_id}#{self.subject}"
        return self.kind if self.subject == self.kind else f"{self.kind}:{self.subject}"

    def _quota_names(self) -> tuple[str, ...]:
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
