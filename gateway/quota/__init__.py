"""Quotas and admission: requests/min, tokens/min and concurrency per principal and tenant (optionally per
model), reserved at admission and settled on real usage; in-process or Redis-backed (shared by replicas);
plus bounded waiting in front of overloaded engines.

Submodules: ``config`` (settings), ``limits`` (which limits apply, the reservation, headers),
``memory`` / ``redis_backend`` (the GCRA limiters), ``overload``, ``admission`` (the Admission hook).
"""

from gateway.quota.config import Limits, OverloadSettings, QuotaSettings, ScopeLimits

__all__ = ["Limits", "OverloadSettings", "QuotaSettings", "ScopeLimits"]
