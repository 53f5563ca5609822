"""The whole local stack in the foreground: embedded S3 server → engine pulling verified weights → gateway.

Run through ``scripts/quickstart`` (which prepares the venv first). When ready it prints two lines to paste,
``export OPENAI_BASE_URL=...`` and ``export OPENAI_API_KEY=...``, then a curl example. Ctrl-C (SIGINT),
SIGTERM and SIGHUP (the terminal closed) stop the whole stack. A stack from an earlier run that is still up
is reused (its export lines are printed again), never duplicated. A busy port is an error that names the
variable to change. State (model, S3 data, weight cache, the API key, logs) lives under .cache/quickstart/.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("QUICKSTART_DIR", ROOT / ".cache" / "quickstart"))
MODEL_NAME = os.environ.get("QUICKSTART_MODEL_NAME", "tiny-chat")
BUCKET = "models"
S3_KEY, S3_SECRET = "quickstart", "quickstart-secret-key"

# Every variable quickstart reads: (name, default, meaning). `--help` prints this table.
VARIABLES: tuple[tuple[str, str, str], ...] = (
    ("QUICKSTART_PORT", "8080", "gateway port (OPENAI_BASE_URL)"),
    ("QUICKSTART_ENGINE_PORT", "8000", "vLLM engine port"),
    ("QUICKSTART_METRICS_PORT", "9400", "engine metrics exporter port (ENGINE_METRICS_PORT)"),
    ("QUICKSTART_GATEWAY_METRICS_PORT", "9091", "gateway /metrics port (GATEWAY_METRICS_PORT)"),
    ("QUICKSTART_S3_PORT", "9100", "embedded S3 server port"),
    ("QUICKSTART_DIR", ".cache/quickstart", "state: demo model, S3 data, weight cache, API key, logs"),
    ("QUICKSTART_MODEL_NAME", "tiny-chat", "the model name clients send"),
    ("ENGINE_CPU_KV_CACHE", "64M", "KV cache of the CPU engine"),
    ("OMP_NUM_THREADS", "1", "CPU threads of the engine"),
    ("VENV", ".venv", "the virtualenv scripts/bootstrap makes and quickstart runs from"),
    ("PYTHON", "python3", "the interpreter (3.11+) that creates the virtualenv"),
)
PORTS = {"gateway": "QUICKSTART_PORT", "engine": "QUICKSTART_ENGINE_PORT", "metrics": "QUICKSTART_METRICS_PORT",
         "gateway-metrics": "QUICKSTART_GATEWAY_METRICS_PORT", "s3": "QUICKSTART_S3_PORT"}
DEFAULTS = {name: default for name, default, _ in VARIABLES}

USAGE = """usage: scripts/quickstart [--help]

Starts the whole local stack in the foreground: an embedded S3 server, a vLLM CPU engine that pulls a small
random-weight demo model from it (verified), and the gateway. When ready it prints
  export OPENAI_BASE_URL=http://127.0.0.1:8080/v1
  export OPENAI_API_KEY=sk-local-...
Ctrl-C, SIGTERM or closing the terminal (SIGHUP) stops everything. Run again while a stack is up: it is
reused (the same two lines are printed), not started twice. The first run creates .venv (scripts/bootstrap).

variables (environment):"""


def usage() -> str:
    width = max(len(n) for n, _, _ in VARIABLES)
    rows = [f"  {n:<{width}}  {m} (default: {d})" for n, d, m in VARIABLES]
    return USAGE + "\n" + "\n".join(rows)


def say(msg: str) -> None:
    print(f"quickstart: {msg}", file=sys.stderr, flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_ok(url: str, proc: subprocess.Popen, timeout: float, name: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.stderr.write(log.read_text(errors="replace")[-3000:])
            raise SystemExit(f"quickstart: {name} exited with {proc.returncode} (log: {log})")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # it answers (S3 says 403 to an anonymous request): it is up
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise SystemExit(f"quickstart: {name} not ready after {timeout:.0f}s (log: {log})")


def _die_with_parent() -> None:
    """In each child: SIGTERM when quickstart itself dies, even by SIGKILL (Linux), so nothing is orphaned."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Stack:
    """The running components, recorded in STATE/stack.json so a later run can find them."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.record: dict = {"pid": os.getpid(), "components": {}}
        (STATE / "logs").mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        tmp = STATE / "stack.json.tmp"
        tmp.write_text(json.dumps(self.record))
        tmp.replace(STATE / "stack.json")

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = STATE / "logs" / f"{name}.log"
        full = dict(os.environ)
        full.update(env)
        full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
        p = subprocess.Popen(
            cmd,
            env=full,
            stdout=open(log, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            cwd=ROOT,
        )
        self.procs.append((name, p))
        self.record["components"][name] = {"pid": p.pid}
        self.save()
        return p, log

    def stop(self) -> None:
        # Reverse order: gateway first (stops traffic), then the engine (vLLM drains), then S3.
        for _, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in time; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # anything left in its group (vLLM workers)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        with contextlib.suppress(FileNotFoundError):
            (STATE / "stack.json").unlink()


def api_key() -> str:
    f = STATE / "api_key"
    if f.is_file():
        return f.read_text().strip()
    key = "sk-local-" + secrets.token_urlsafe(24)
    f.write_text(key + "\n")
    f.chmod(0o600)
    return key


def print_exports(base: str, key: str) -> None:
    print(f"export OPENAI_BASE_URL={base}")
    print(f"export OPENAI_API_KEY={key}", flush=True)


def earlier_stack() -> int | None:
    """Deal with a stack an earlier run left: None to go on starting, else the exit status of this run."""
    f = STATE / "stack.json"
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    owner = int(rec.get("pid", 0))
    if owner and "quickstart" in _cmdline(owner):
        base = rec.get("base_url")
        ready = False
        if base:
            try:
                with urllib.request.urlopen(base.removesuffix("/v1") + "/readyz", timeout=3) as r:
                    ready = r.status == 200
            except Exception:
                ready = False
        if ready:
            say(f"a stack from an earlier run is up (quickstart pid {owner}): reusing it, not starting another")
            say(f"stop it with: kill {owner}")
            print_exports(base, api_key())
            return 0
        say(
            f"a stack from an earlier run is still starting or unhealthy (quickstart pid {owner}); refusing to "
            f"start a second one. Wait for it, or stop it with: kill {owner}"
        )
        return 1
    # Its quickstart is gone: stop what it left behind (only processes that are still ours).
    left = 0
    for name, comp in rec.get("components", {}).items():
        pid = int(comp.get("pid", 0))
        marker = {"s3": "nanio", "engine": "engine", "gateway": "gateway"}.get(name, name)
        if pid and marker in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
                left += 1
    if left:
        say(f"stopped {left} leftover process group(s) of an earlier run")
        time.sleep(2)
    f.unlink(missing_ok=True)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    if argv:
        print(f"quickstart: unknown argument {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    STATE.mkdir(parents=True, exist_ok=True)
    status = earlier_stack()
    if status is not None:
        return status
    ports = {}
    for comp, var in PORTS.items():
        raw = os.environ.get(var, DEFAULTS[var])
        try:
            ports[comp] = int(raw)
        except ValueError:
            say(f"{var}={raw!r} is not a port number")
            return 1
        if not port_free(ports[comp]):
            say(f"port {ports[comp]} ({comp}) is in use by another program: set {var} to a free port")
            return 1

    py = sys.executable
    stack = Stack()
    stopping = {"flag": False}

    def on_signal(signum, frame):
        if stopping["flag"]:
            return
        stopping["flag"] = True
        say(f"{signal.Signals(signum).name}: stopping the stack")
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        # 1. the demo model (built offline, deterministic)
        sys.path.insert(0, str(ROOT))
        from engine.testmodel import build_test_model

        model_dir = build_test_model(STATE / "model" / MODEL_NAME, seed=0)
        say(f"demo model at {model_dir}")

        # 2. embedded S3 server (nanio, real SigV4 checks), bound to 127.0.0.1 only
        s3_port = ports["s3"]
        s3_env = {"NANIO_ACCESS_KEY": S3_KEY, "NANIO_SECRET_KEY": S3_SECRET}
        s3, s3_log = stack.start(
            "s3",
            [py, "-m", "nanio", "serve", "--host", "127.0.0.1", "--port", str(s3_port), "--data-dir", str(STATE / "s3"), "--no-access-log", "--log-level", "warning"],
            s3_env,
        )
        wait_ok(f"http://127.0.0.1:{s3_port}/", s3, 90, "S3 server", s3_log)
        s3_vars = {
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_REGION": "us-east-1",
        }
        uri = f"s3://{BUCKET}/{MODEL_NAME}"
        say(f"S3 server on 127.0.0.1:{s3_port}; pushing the model to {uri} (skipped when already there)")
        env = dict(os.environ, **s3_vars, PYTHONPATH=str(ROOT))
        if _ensure_bucket(s3_port):
            say("the model is already in S3 (its manifest is there): not pushing again")
        else:
            r = subprocess.run([py, "-m", "engine", "push", str(model_dir), uri, "--no-progress"], env=env, cwd=ROOT, stdout=sys.stderr)
            if r.returncode != 0:
                raise SystemExit("quickstart: pushing the model failed")

        # 3. the engine: pulls from S3, verifies every file, then runs vLLM's CPU build
        eng_port = ports["engine"]
        tmp = STATE / "tmp"
        tmp.mkdir(exist_ok=True)
        eng_env = dict(
            s3_vars,
            ENGINE_MODEL=uri,
            ENGINE_SERVED_MODEL_NAME=MODEL_NAME,
            ENGINE_PORT=str(eng_port),
            ENGINE_METRICS_PORT=str(ports["metrics"]),
            ENGINE_HOST="127.0.0.1",
            ENGINE_CACHE_DIR=str(STATE / "engine-cache"),
            ENGINE_CPU_KV_CACHE=os.environ.get("ENGINE_CPU_KV_CACHE", "64M"),
            ENGINE_MAX_MODEL_LEN="2048",
            # OpenAI tools out of the box (a named tool_choice is decoded as JSON matching the tool's schema), and
            # JSON output without free whitespace (random weights otherwise fill JSON with endless whitespace).
            ENGINE_ENABLE_AUTO_TOOL_CHOICE="true",
            ENGINE_TOOL_CALL_PARSER="hermes",
            ENGINE_TOOL_CALL_STRUCTURAL_TAGS="false",
            ENGINE_STRUCTURED_OUTPUTS_DISABLE_ANY_WHITESPACE="true",
            ENGINE_RESPONSES_STORE="true",
            TMPDIR=str(tmp),
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
            VLLM_TARGET_DEVICE="cpu",
        )
        say(f"starting the engine (vLLM CPU build; ~30-60 s; phases in {STATE / 'logs' / 'engine.log'})")
        eng, eng_log = stack.start("engine", [py, "-m", "engine", "run"], eng_env)
        wait_ok(f"http://127.0.0.1:{eng_port}/health", eng, 600, "engine", eng_log)

        # 4. the gateway, with one API key (only its digest is in the config)
        key = api_key()
        gw_port = ports["gateway"]
        cfg = STATE / "gateway.yaml"
        cfg.write_text(
            "models:\n"
            f"  - name: {MODEL_NAME}\n"
            f"    upstreams: [\"http://127.0.0.1:{eng_port}\"]\n"
            "api_keys:\n"
            "  - id: quickstart\n"
            f"    sha256: {hashlib.sha256(key.encode()).hexdigest()}\n"
            "    tenant: local\n"
            "    models: [\"*\"]\n"
        )
        metrics_port = ports["gateway-metrics"]
        gw_env = {"GATEWAY_CONFIG": str(cfg), "GATEWAY_PORT": str(gw_port), "GATEWAY_METRICS_PORT": str(metrics_port)}
        gw, gw_log = stack.start("gateway", [py, "-m", "gateway", "serve"], gw_env)
        wait_ok(f"http://127.0.0.1:{gw_port}/readyz", gw, 60, "gateway", gw_log)
        base = f"http://127.0.0.1:{gw_port}/v1"
        stack.record["base_url"] = base
        stack.save()
        say("ready; paste these two lines into your shell:")
        print_exports(base, key)
        print(
            f"\n# try it:\ncurl -s {base}/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{MODEL_NAME}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 32}}'\n"
            f"# metrics: http://127.0.0.1:{metrics_port}/metrics   logs: {STATE / 'logs'}   stop: Ctrl-C",
            file=sys.stderr,
            flush=True,
        )
        while True:
            for name, p in stack.procs:
                if p.poll() is not None:
                    say(f"{name} exited with {p.returncode}; stopping (log: {STATE / 'logs' / (name + '.log')})")
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        if not stopping["flag"]:
            say("stopping the stack")
            stopping["flag"] = True
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stack.stop()
        say("stopped")


def _ensure_bucket(port: int) -> bool:
    """Create the bucket if needed; True when the model's manifest is already there (a complete push)."""
    from minio import Minio
    from minio.error import S3Error

    from engine.manifest import MANIFEST_NAME

    c = Minio(f"127.0.0.1:{port}", access_key=S3_KEY, secret_key=S3_SECRET, secure=False, region="us-east-1")
    if not c.bucket_exists(BUCKET):
        c.make_bucket(BUCKET)
        return False
    try:
        c.stat_object(BUCKET, f"{MODEL_NAME}/{MANIFEST_NAME}")
        return True
    except S3Error:
        return False


if __name__ == "__main__":
    sys.exit(main())
