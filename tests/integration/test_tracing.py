"""Optional OpenTelemetry tracing, end to end: client traceparent -> gateway span -> vLLM's span.

A real vLLM engine with its own OTLP exporter (``--otlp-traces-endpoint``) and a gateway with tracing on
both export to an OTLP/HTTP receiver run by the test, which decodes the real protobuf payloads."""

from __future__ import annotations

import gzip
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import KEY_ALL, MODEL, gateway_config
from tests.support import Engine

pytestmark = pytest.mark.engine


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf exports on /v1/traces and keeps every span with its service name."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[tuple[str, object]] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                req = trace_service_pb2.ExportTraceServiceRequest()
                req.ParseFromString(body)
                with lock:
                    for rs in req.resource_spans:
                        service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                outer.spans.append((service, sp))
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, pred, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [(svc, s) for svc, s in list(self.spans) if pred(svc, s)]
            if found:
                return found
            time.sleep(0.2)
        raise AssertionError(f"no matching span after {timeout}s; have {[(svc, s.name) for svc, s in self.spans]}")

    def stop(self) -> None:
        self.server.shutdown()


def _attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value or v.int_value or v.bool_value or v.double_value
    return out


def test_trace_continues_from_client_through_gateway_into_vllm(tiny_model_dir, gateway_factory):
    rx = OtlpReceiver()
    engine = Engine(str(tiny_model_dir), served_name=MODEL, extra_env={
        "ENGINE_EXTRA_ARGS": f"--otlp-traces-endpoint {rx.url}",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "vllm-engine",
    })
    try:
        engine.wait_ready()
        g = gateway_factory(gateway_config(
            [engine.url], tracing={"enabled": True, "otlp_endpoint": rx.url, "export_interval": 0.2}))
        trace_id, client_span = os.urandom(16).hex(), os.urandom(8).hex()
        r = httpx.post(g.url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": "trace me", "max_tokens": 4, "ignore_eos": True},
            headers={"authorization": f"Bearer {KEY_ALL}", "traceparent": f"00-{trace_id}-{client_span}-01"})
        assert r.status_code == 200, r.text
        refused_trace = os.urandom(16).hex()
        r2 = httpx.post(g.url + "/v1/completions", json={"model": MODEL, "prompt": "x"},
                        headers={"traceparent": f"00-{refused_trace}-{os.urandom(8).hex()}-01"})
        assert r2.status_code == 401

        [(svc, gw_span)] = rx.wait_for(lambda svc, s: s.trace_id.hex() == trace_id and svc == "llm-gateway")
        assert gw_span.parent_span_id.hex() == client_span
        assert gw_span.name == "POST /v1/completions"
        a = _attrs(gw_span)
        assert a["http.response.status_code"] == 200 and a["llm.model"] == MODEL
        assert a["llm.usage.completion_tokens"] == r.json()["usage"]["completion_tokens"] == 4
        assert a["llm.usage.prompt_tokens"] == r.json()["usage"]["prompt_tokens"]

        # vLLM's own span is a child of the gateway's span, in the client's trace.
        vllm_spans = rx.wait_for(lambda svc, s: s.trace_id.hex() == trace_id and svc != "llm-gateway")
        assert {s.parent_span_id for _, s in vllm_spans} == {gw_span.span_id}

        [(_, refused)] = rx.wait_for(lambda svc, s: s.trace_id.hex() == refused_trace)
        ra = _attrs(refused)
        assert ra["http.response.status_code"] == 401 and ra["llm.decision"] == "unauthenticated"
        assert "llm.model" not in ra
    finally:
        engine.stop()
        rx.stop()
