"""The hot path: plain ASGI endpoints that parse, authenticate, admit, route and relay proxied requests.

Modules, in the order a request meets them: ``request`` (the immutable ``ProxyRequest``), ``endpoint``
(the pipeline), ``forward`` (attempt loop), ``relay`` (streams), ``sse`` (pure functions over event bytes),
``respond`` (what the client gets); ``routes`` lists the proxied OpenAI routes.
"""

from gateway.proxy.endpoint import ProxyEndpoint
from gateway.proxy.request import ProxyRequest, RouteSpec

__all__ = ["ProxyEndpoint", "ProxyRequest", "RouteSpec"]
