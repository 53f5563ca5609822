"""The audit log: exactly one durable, redacted, tamper-evident JSON record per request.

Modules (import what you need; this package file stays import-light so settings can import its config):

- ``config``   AuditSettings (the ``audit:`` section of the gateway config)
- ``redact``   PII redaction (phones, e-mail, PRC ID numbers, bank cards, IPs; extensible)
- ``record``   the ECS-style record built from a RequestContext
- ``chain``    the per-segment hash chain and ``verify`` (``llm-gateway audit verify``)
- ``sink``     stdout and rotating file sinks, torn-line recovery
- ``writer``   AuditWriter: the Observer with a bounded queue and a writer task; AuditGate (back-pressure)
- ``archive``  upload of closed segments to S3/MinIO, deleted locally only after verification
"""
