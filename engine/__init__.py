"""The engine: one model replica's lifecycle. Pull weights (verified) → build vLLM's arguments → run and
supervise vLLM. Never imported by the gateway."""

__version__ = "0.1.0"
