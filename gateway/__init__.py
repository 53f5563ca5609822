"""The gateway: a thin, fast OpenAI-compatible front door for vLLM engines.

Public surface: :func:`gateway.app.create_app` and :class:`gateway.settings.GatewaySettings`.
"""

from gateway import native as _native

__version__ = "0.1.0"

# The request path's modules may be compiled (gateway/native.py): a build older than its sources is never used.
_native.guard()
