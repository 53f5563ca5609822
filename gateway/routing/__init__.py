"""Routing across engine replicas: pools of endpoints, health, and the choice of one per request."""

from gateway.routing.pool import Endpoint, EndpointPool

__all__ = ["Endpoint", "EndpointPool"]
