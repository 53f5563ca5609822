"""Identity and access: who is calling (authenticate) and may they use this model (authorize)."""

from gateway.auth.authenticator import Authenticator
from gateway.auth.principal import Principal

__all__ = ["Authenticator", "Principal"]
