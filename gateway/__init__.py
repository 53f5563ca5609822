"""The gateway: a thin, fast OpenAI-compatible front door for vLLM engines.

Public surface: :func:`gateway.app.create_app` and :class:`gateway.settings.GatewaySettings`.
"""

__version__ = "0.1.0"
