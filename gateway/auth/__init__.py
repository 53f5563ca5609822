"""Identity and access: who is calling (authenticate) and may they use this model (authorize)."""

from gateway.auth.principal import Principal
from gateway.auth.authenticator import Authenticator

__all__ = ["Authenticator", "Principal"]
