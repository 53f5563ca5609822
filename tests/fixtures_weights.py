"""Fixtures for the weights tests: a fresh bucket per test, the S3 env, a byte-counting TCP proxy in front of
the S3 server (proves what a pull really fetched), and a CLI runner that poisons torch/vllm imports."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from tests.support import PY, REPO

# Runs llm-engine with `import vllm` / `import torch` made to fail: push/pull must work in a slim container.
POISONED_MAIN = (
    "import sys\n"
    "for m in ('vllm', 'torch', 'transformers'):\n"
    "    sys.modules[m] = None\n"
    "from engine.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def engine_cli_argv(*args: str) -> list[str]:
    return [PY, "-c", POISONED_MAIN, *args]


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "ENGINE_", "SSL_CERT_", "REQUESTS_CA"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_engine_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(engine_cli_argv(*args), env=cli_env(env), capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))


class _RequestHeads:
    """Incremental parser of one connection's client→server bytes: records request heads, skips bodies."""

    def __init__(self, sink: list) -> None:
        self.sink = sink
        self.buf = b""
        self.body_left = 0

    def feed(self, data: bytes) -> None:
        while data:
            if self.body_left:
                n = min(self.body_left, len(data))
                self.body_left -= n
                data = data[n:]
                continue
            self.buf += data
            data = b""
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = self.buf[:end], self.buf[end + 4:]
            self.buf = b""
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            self.sink.append((time.monotonic(), method, path, headers))
            self.body_left = int(headers.get("content-length", "0") or 0)
            data = rest


class CountingProxy:
    """A TCP proxy on 127.0.0.1 (optionally terminating TLS) that counts bytes sent to clients and records every
    request's method, path, headers and arrival time."""

    def __init__(self, target_port: int, tls: ssl.SSLContext | None = None) -> None:
        self.target_port = target_port
        self.tls = tls
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self.bytes_down = 0
        self._requests: list[tuple[float, str, str, dict[str, str]]] = []
        self._closed = False
        # Fault injection: drop the connection once, after this many bytes went to the client.
        self.cut_after: int | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.bytes_down = 0
            self._requests.clear()

    def timed_requests(self) -> list[tuple[float, str, str, dict[str, str]]]:
        """(arrival time, method, path, headers) of every request since the last reset, in arrival order."""
        with self._lock:
            return sorted(self._requests, key=lambda r: r[0])

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        return [r[1:] for r in self.timed_requests()]

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:  # includes a failed TLS handshake
            client.close()
            return
        heads = _RequestHeads(self._requests)
        threading.Thread(target=self._pipe, args=(client, upstream, heads), daemon=True).start()
        self._pipe(upstream, client, None)

    def _pipe(self, src: socket.socket, dst: socket.socket, heads: _RequestHeads | None) -> None:
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                with self._lock:
                    if heads is None:
                        if self.cut_after is not None and self.bytes_down + len(data) > self.cut_after:
                            data = data[: self.cut_after - self.bytes_down]
                            self.cut_after = None
                            self.bytes_down += len(data)
                            dst.sendall(data)
                            break
                        self.bytes_down += len(data)
                    else:
                        heads.feed(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


@pytest.fixture
def s3_bucket(s3_server: Any) -> Iterator[str]:
    """A fresh bucket for one test."""
    name = f"w-{uuid.uuid4().hex[:12]}"
    s3_server.client().make_bucket(name)
    yield name


@pytest.fixture
def s3_env(s3_server: Any) -> dict[str, str]:
    return s3_server.env()


@pytest.fixture
def s3_proxy(s3_server: Any) -> Iterator[CountingProxy]:
    p = CountingProxy(s3_server.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA (PEM file for AWS_CA_BUNDLE) and a server context for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-engine test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem = d / "ca.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "server.pem", d / "server.key")
    return ca_pem, ctx


__all__ = ["tls_ca", "CountingProxy", "engine_cli_argv", "cli_env", "run_engine_cli", "s3_bucket", "s3_env", "s3_proxy"]
