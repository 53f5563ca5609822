"""The quota backend's own RESP client (gateway/quota/resp.py) against real redis-servers: replies matched to
their commands under pipelined concurrency, scripts after a script-cache flush, AUTH/SELECT, error replies,
timeouts on a server that never answers, and the admission hook through a Redis killed mid-traffic."""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid
from collections.abc import AsyncIterator

import pytest

from gateway.errors import ApiError
from gateway.quota.admission import BACKEND_ERRORS, QuotaAdmission
from gateway.quota.fallback import ReplicaCount
from gateway.quota.limits import Bucket
from gateway.quota.metrics import QuotaMetrics
from gateway.quota.redis_backend import ACQUIRE_LUA, RedisLimiter
from gateway.quota.resp import (
    RedisBusyError,
    RedisClient,
    RedisConnectionError,
    RedisError,
    RedisTimeoutError,
    ResponseError,
    Script,
    bulk,
    parse_url,
)
from tests.fixtures_quota import RedisServer, _need_redis
from tests.integration.test_quota_backends import _metric, request, settings, try_admit


@pytest.mark.parametrize("connections", [1, 2])
async def test_pipelined_replies_match_their_commands_under_concurrency(redis_server, connections):
    c = RedisClient(redis_server.url, timeout=5.0, connections=connections)
    key = f"test:{uuid.uuid4().hex}"
    try:

        async def one(i: int):
            if i % 3 == 0:
                return i, await c.execute("ECHO", f"value-{i}")
            if i % 3 == 1:
                return i, await c.execute("HSET", key, f"f{i}", i)
            return i, await c.pipeline([("ECHO", f"a-{i}"), ("ECHO", f"b-{i}")])

        results = await asyncio.gather(*(one(i) for i in range(600)))
        for i, r in results:
            if i % 3 == 0:
                assert r == f"value-{i}".encode()
            elif i % 3 == 1:
                assert r == 1  # one new field each: a reply taken by another command would show up here
            else:
                assert r == [f"a-{i}".encode(), f"b-{i}".encode()]
        assert await c.execute("HLEN", key) == 200
    finally:
        await c.close()


async def test_error_replies_raise_and_leave_the_connection_usable(redis_server):
    c = RedisClient(redis_server.url, timeout=5.0)
    key = f"test:{uuid.uuid4().hex}"
    try:
        await c.execute("SET", key, "not a number")
        results = await asyncio.gather(
            c.execute("ECHO", "before"),
            c.execute("INCR", key),
            c.execute("ECHO", "after"),
            return_exceptions=True,
        )
        assert results[0] == b"before" and results[2] == b"after"
        assert isinstance(results[1], ResponseError) and "not an integer" in str(results[1])
        assert isinstance(results[1], BACKEND_ERRORS)
        bad = Script("return redis.call('INCR', KEYS[1])")
        with pytest.raises(ResponseError, match="not an integer"):
            await c.evalsha(bad, bulk(1) + bulk(key), 2)
        with pytest.raises(ResponseError, match="EXECABORT|wrong number"):
            await c.transaction([("ECHO",)])
        assert await c.execute("GET", key) == b"not a number"
    finally:
        await c.close()


async def test_a_cancelled_caller_does_not_shift_the_replies_of_others(redis_server):
    c = RedisClient(redis_server.url, timeout=5.0)
    try:
        slow = asyncio.ensure_future(c.execute("ECHO", "first"))
        await asyncio.sleep(0)  # sent (queued), then its caller gives up
        slow.cancel()
        assert await c.execute("ECHO", "second") == b"second"
        assert await c.execute("ECHO", "third") == b"third"
    finally:
        await c.close()


async def test_scripts_survive_a_script_cache_flush(redis_server):
    lim = RedisLimiter(redis_server.url, prefix=f"test:{uuid.uuid4().hex}:", timeout=5.0)
    r = redis_server.client()
    buckets = (Bucket("p:key:alice", 1000, 100_000, 10),)
    try:
        d = await lim.acquire(buckets, 10, "lease-1")
        assert d.allowed and d.states[0].req_remaining >= 0
        r.script_flush()
        sha = Script(ACQUIRE_LUA).sha.decode()
        assert r.script_exists(sha) == [False]
        # NOSCRIPT -> sent again as EVAL, which caches the script again; then EVALSHA works as before.
        for lease in ("lease-2", "lease-3"):
            d = await lim.acquire(buckets, 10, lease)
            assert d.allowed
        assert r.script_exists(sha) == [True]
        assert r.zcard(lim.prefix + "p:key:alice:c") == 3
        r.script_flush()
        await lim.release(buckets, "lease-1", -10)  # the settle script recovers the same way
        assert r.zcard(lim.prefix + "p:key:alice:c") == 2
    finally:
        r.close()
        await lim.close()


@pytest.fixture
async def auth_redis() -> AsyncIterator[RedisServer]:
    """A redis-server with a password for the default user and an ACL user ``quota``."""
    _need_redis()
    srv = RedisServer(args=("--requirepass", "s3cret pass")).start()
    try:
        c = RedisClient(f"redis://:s3cret%20pass@127.0.0.1:{srv.port}/0", timeout=5.0)
        await c.execute("ACL", "SETUSER", "quota", "on", ">quota-pw", "~*", "+@all")
        await c.close()
        yield srv
    finally:
        srv.stop()


async def test_auth_and_select_on_connect(auth_redis):
    port = auth_redis.port
    key = f"test:{uuid.uuid4().hex}"
    c = RedisClient(f"redis://:s3cret%20pass@127.0.0.1:{port}/3", timeout=5.0)
    user = RedisClient(f"redis://quota:quota-pw@127.0.0.1:{port}/5", timeout=5.0)
    db0 = RedisClient(f"redis://:s3cret%20pass@127.0.0.1:{port}", timeout=5.0)
    try:
        await c.execute("SET", key, "in-db-3")
        await user.execute("SET", key, "in-db-5")
        assert await db0.execute("GET", key) is None
        assert await db0.pipeline([("SELECT", 3), ("GET", key), ("SELECT", 5), ("GET", key)]) == [
            b"OK",
            b"in-db-3",
            b"OK",
            b"in-db-5",
        ]
        assert await user.execute("ACL", "WHOAMI") == b"quota"
    finally:
        for x in (c, user, db0):
            await x.close()
    for url in (f"redis://:wrong@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
        bad = RedisClient(url, timeout=5.0)
        try:
            with pytest.raises(RedisError, match="NOAUTH|WRONGPASS|invalid"):
                await bad.execute("GET", key)
        finally:
            await bad.close()


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and reads, but never answers (a stalled Redis)."""
    conns: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in conns:
            w.close()


async def test_a_server_that_never_answers_times_every_pending_command_out(silent_server):
    c = RedisClient(f"redis://127.0.0.1:{silent_server}/0", timeout=0.3, max_pending=8)
    try:
        results = await asyncio.gather(
            *(c.execute("ECHO", str(i)) for i in range(10)), return_exceptions=True
        )
        busy = [r for r in results if isinstance(r, RedisBusyError)]
        timed_out = [r for r in results if isinstance(r, RedisTimeoutError)]
        assert len(busy) == 2 and len(timed_out) == 8  # bounded pending queue; the rest wait for the timeout
        assert all(isinstance(r, BACKEND_ERRORS) for r in results)
        with pytest.raises(RedisTimeoutError):  # a new connection, stalled again
            await c.execute("PING")
    finally:
        await c.close()


async def test_admission_on_a_stalled_redis_fails_closed(silent_server):
    s = settings("redis", f"redis://127.0.0.1:{silent_server}/0", rpm=10)
    s.redis_timeout = 0.3
    s.on_backend_error = "closed"
    reg = QuotaMetrics()
    adm = QuotaAdmission(s, reg)
    try:
        results = await asyncio.gather(*(try_admit(adm, request()) for _ in range(3)))
        assert [r.status for r in results] == [503, 503, 503]
        assert (
            _metric(reg, "llm_gateway_quota_backend_errors_total", {"backend": "redis", "mode": "closed"})
            == 3
        )
    finally:
        await adm.close()


async def test_connection_refused_is_a_backend_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    c = RedisClient(f"redis://127.0.0.1:{port}/0", timeout=2.0)
    try:
        with pytest.raises(RedisConnectionError) as e:
            await c.execute("PING")
        assert isinstance(e.value, BACKEND_ERRORS) and f"127.0.0.1:{port}" in str(e.value)
    finally:
        await c.close()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_killed_mid_traffic_then_recovery_and_replay(own_redis, mode):
    s = settings("redis", own_redis.url, rpm=100_000, tpm=10_000_000, max_concurrent=1000)
    s.redis_retry_interval = 0.0
    s.redis_timeout = 2.0
    s.on_backend_error = mode
    reg = QuotaMetrics()
    adm = QuotaAdmission(s, reg)
    r = own_redis.client()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            ctx = request(max_tokens=20)
            t = await try_admit(adm, ctx)
            if isinstance(t, ApiError):
                statuses.append(t.status)
                await asyncio.sleep(0.005)
                continue
            statuses.append(200)
            await asyncio.sleep(0.001)
            ctx.first_token_at, ctx.prompt_tokens, ctx.completion_tokens = 1.0, 3, 5
            await t.settle(ctx)

    try:
        workers = [asyncio.create_task(traffic()) for _ in range(16)]
        await asyncio.sleep(0.3)
        held = [(ctx, await adm.admit(ctx)) for ctx in (request(max_tokens=20) for _ in range(3))]
        before = len(statuses)
        own_redis.proc.signal(signal.SIGKILL)
        own_redis.proc.proc.wait(10)
        await asyncio.sleep(0.4)
        down = statuses[before:]
        assert down, "no request was decided while Redis was down"
        assert _metric(reg, "llm_gateway_quota_backend_up", {"backend": "redis"}) == 0
        errors = _metric(reg, "llm_gateway_quota_backend_errors_total", {"backend": "redis", "mode": mode})
        assert errors > 0
        # Tickets taken before Redis died cannot settle: deferred for the replay.
        for ctx, t in held:
            ctx.first_token_at, ctx.prompt_tokens, ctx.completion_tokens = 1.0, 3, 5
            await t.settle(ctx)
        assert _metric(reg, "llm_gateway_quota_settle_errors_total", {"backend": "redis"}) >= 3
        assert len(adm._deferred) >= 3
        if mode == "open":
            assert set(down) == {200}  # local limits, far from reached
        else:
            assert 503 in down and 200 not in down[len(down) // 2 :]
        own_redis.start()
        for _ in range(200):
            if _metric(reg, "llm_gateway_quota_backend_up", {"backend": "redis"}) == 1:
                break
            await asyncio.sleep(0.05)
        assert _metric(reg, "llm_gateway_quota_backend_up", {"backend": "redis"}) == 1
        after = len(statuses)
        await asyncio.sleep(0.3)
        assert set(statuses[after:]) == {200}
        stop.set()
        await asyncio.gather(*workers)
        if adm._replay is not None:
            await adm._replay
        # Every settlement that failed while Redis was down was replayed, or dropped as a lease of the lost state.
        assert not adm._deferred
        assert r.zcard(s.key_prefix + "p:key:alice:c") == 0  # every slot of the restarted Redis was released
    finally:
        stop.set()
        r.close()
        await adm.close()


async def test_replica_count_through_the_resp_client(redis_server):
    prefix = f"test:{uuid.uuid4().hex}:"
    a = RedisClient(redis_server.url, timeout=5.0)
    b = RedisClient(redis_server.url, timeout=5.0)
    try:
        assert await ReplicaCount(a, prefix).beat() == 1
        assert await ReplicaCount(b, prefix).beat() == 2
    finally:
        await a.close()
        await b.close()


def test_url_forms():
    a = parse_url("redis://:p%40ss@redis.example:6380/2")
    assert (a.host, a.port, a.db, a.username, a.password, a.tls) == (
        "redis.example",
        6380,
        2,
        None,
        "p@ss",
        False,
    )
    a = parse_url("rediss://user:pw@redis.example?ssl_cert_reqs=none")
    assert (a.port, a.db, a.username, a.tls) == (6379, 0, "user", True)
    assert a.ssl_context() is not None and a.ssl_context().check_hostname is False
    a = parse_url("unix:///run/redis.sock?db=4")
    assert (a.path, a.db) == ("/run/redis.sock", 4)
    for bad, why in [
        ("http://redis:6379", "scheme"),
        ("redis://redis:6379/x", "database"),
        ("redis://redis:6379/0?ssl=true", "unsupported query"),
        ("redis://:secret@:6379", "no host"),
    ]:
        with pytest.raises(ValueError, match=why) as e:
            parse_url(bad)
        assert "secret" not in str(e.value)


def _self_signed(dir_: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = Path(dir_) / "redis.crt", Path(dir_) / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_path), str(key_path)


async def test_rediss_tls_with_a_verified_certificate(tmp_path):
    _need_redis()
    from tests.support import free_port

    cert, key = _self_signed(str(tmp_path))
    tls_port = free_port()
    srv = RedisServer(
        args=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-ca-cert-file",
            cert,
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "pw",
        )
    ).start()
    try:
        good = RedisClient(f"rediss://:pw@127.0.0.1:{tls_port}/2?ssl_ca_certs={cert}", timeout=5.0)
        unverified = RedisClient(f"rediss://:pw@127.0.0.1:{tls_port}/2?ssl_cert_reqs=none", timeout=5.0)
        untrusted = RedisClient(f"rediss://:pw@127.0.0.1:{tls_port}/2", timeout=5.0)  # system CAs only
        try:
            assert await good.pipeline([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
            assert await unverified.execute("GET", "k") == b"v"
            with pytest.raises(
                RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"
            ):
                await untrusted.execute("GET", "k")
        finally:
            for c in (good, unverified, untrusted):
                await c.close()
    finally:
        srv.stop()


async def test_unix_socket_url(tmp_path):
    _need_redis()
    sock = str(tmp_path / "redis.sock")
    srv = RedisServer(args=("--unixsocket", sock, "--unixsocketperm", "700")).start()
    c = RedisClient(f"unix://{sock}?db=1", timeout=5.0)
    try:
        assert await c.pipeline([("SET", "k", "unix"), ("GET", "k")]) == [b"OK", b"unix"]
        assert srv.client().get("k") is None  # db 0 over TCP: the key went to db 1
    finally:
        await c.close()
        srv.stop()
