"""The whole local stack in the foreground: embedded S3 server → engine pulling verified weights → gateway.

Run through ``scripts/quickstart`` (which prepares the venv first). When ready it prints exactly two lines,
``OPENAI_BASE_URL=...`` and ``OPENAI_API_KEY=...``, then a curl example; Ctrl-C or SIGTERM stops everything.
State (model, S3 data, weight cache, the API key) lives under .cache/quickstart/ so re-runs are fast.
"""

from __future__ import annotations

import hashlib
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


def say(msg: str) -> None:
    print(f"quickstart: {msg}", file=sys.stderr, flush=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def pick_port(preferred: int) -> int:
    if port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Stack:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []
        (STATE / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = STATE / "logs" / f"{name}.log"
        full = dict(os.environ)
        full.update(env)
        full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
        p = subprocess.Popen(cmd, env=full, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        self.procs.append((name, p))
        return p, log

    def stop(self) -> None:
        # Reverse order: gateway first (stops traffic), then the engine (vLLM drains), then S3.
        for _, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name, p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in time; killing it")
            try:
                os.killpg(p.pid, signal.SIGKILL)  # anything left in its group (vLLM workers)
            except ProcessLookupError:
                pass


def api_key() -> str:
    f = STATE / "api_key"
    if f.is_file():
        return f.read_text().strip()
    key = "sk-local-" + secrets.token_urlsafe(24)
    f.write_text(key + "\n")
    f.chmod(0o600)
    return key


def main() -> int:
    py = sys.executable
    stack = Stack()
    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        # 1. the demo model (built offline, deterministic)
        sys.path.insert(0, str(ROOT))
        from engine.testmodel import build_test_model

        model_dir = build_test_model(STATE / "model" / MODEL_NAME, seed=0)
        say(f"demo model at {model_dir}")

        # 2. embedded S3 server (nanio, real SigV4 checks), bound to 127.0.0.1 only
        s3_port = pick_port(int(os.environ.get("QUICKSTART_S3_PORT", "9100")))
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
        eng_port = pick_port(int(os.environ.get("QUICKSTART_ENGINE_PORT", "8000")))
        tmp = STATE / "tmp"
        tmp.mkdir(exist_ok=True)
        eng_env = dict(
            s3_vars,
            ENGINE_MODEL=uri,
            ENGINE_SERVED_MODEL_NAME=MODEL_NAME,
            ENGINE_PORT=str(eng_port),
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
        say("starting the engine (vLLM CPU build; ~30-60 s)")
        eng, eng_log = stack.start("engine", [py, "-m", "engine", "run"], eng_env)
        wait_ok(f"http://127.0.0.1:{eng_port}/health", eng, 600, "engine", eng_log)

        # 4. the gateway, with one API key (only its digest is in the config)
        key = api_key()
        gw_port = pick_port(int(os.environ.get("QUICKSTART_PORT", "8080")))
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
        gw, gw_log = stack.start("gateway", [py, "-m", "gateway", "serve"], {"GATEWAY_CONFIG": str(cfg), "GATEWAY_PORT": str(gw_port)})
        wait_ok(f"http://127.0.0.1:{gw_port}/readyz", gw, 60, "gateway", gw_log)
        base = f"http://127.0.0.1:{gw_port}/v1"
        print(f"OPENAI_BASE_URL={base}")
        print(f"OPENAI_API_KEY={key}", flush=True)
        print(
            f"\n# try it:\ncurl -s {base}/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{MODEL_NAME}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 32}}'\n"
            f"# logs: {STATE / 'logs'}   stop: Ctrl-C",
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
        say("stopping")
        return 0
    finally:
        stack.stop()


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
