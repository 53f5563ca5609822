#!/usr/bin/env bash
# req/s scaling from one worker process to two on the H200 host's CPUs (16 vCPUs, a Firecracker microVM), Python 3.12:
# our gateway with in-memory and with Redis quotas beside a bare ASGI + aiohttp proxy, JSON and SSE, against an
# nginx upstream that answers at once (scripts/bench_scaling.py says what is measured and how).
#
# The device machine has Python 3.12, aiohttp, uvloop, prometheus-client, pyyaml and httpx, but neither the
# gateway's other dependencies nor wrk, nginx and redis-server, and no network. So everything travels in one
# ignored folder of the checkout, $SCALE_DIR (default .scale):
#   $SCALE_DIR/whl/     Python 3.12 wheels: starlette uvicorn httptools msgspec hiredis pydantic pydantic-core
#                       pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions joserfc
#                       authlib cryptography cffi pycparser minio (pip download --only-binary=:all:
#                       --python-version 3.12 --platform manylinux_2_17_x86_64 ..., see the device README)
#   $SCALE_DIR/bin/     wrk, nginx, redis-server (Debian 12 builds) and $SCALE_DIR/lib/ the shared libraries
#                       they need beyond glibc (ldd: libluajit, libpcre2-8, libssl, libcrypto, libz, libcrypt,
#                       libjemalloc, liblzf, libsystemd, ...), used through LD_LIBRARY_PATH for them alone
#   $SCALE_DIR/perf/    the side-by-side harness: gen_nginx.py, wrk/chat.lua, proxies/proxy_asgi.py,
#                       ours/full.yaml, ours/full-redis.yaml
#   $SCALE_DIR/scripts/ this script and bench_scaling.py (the device gets the session's checkout, not a branch)
#   $SCALE_DIR/src/     optional: the gateway tree to measure (git archive <commit> gateway configkit objectstore,
#                       with the commit in src/COMMIT); without it, the checkout itself (GATEWAY_SRC overrides)
# Command (device tool, from the repository root; $OUT is the folder whose files come back):
#   run(kind=nvidia-h200, carry=[".scale"], timeout_s=600,
#       command="bash .scale/scripts/gpu/proxy_scaling_h200.sh")
# Knobs (environment): ROUNDS=2 DURATION=8 WARMUP=2 CONNS=128,64 BUDGET_S=430 HARD_S=520 SYSTEMS=... MODES=json,sse
# Output: $OUT/scaling.json, $OUT/scaling.md, $OUT/log.txt (copied into results/h200/proxy_scaling.*).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
S="$(cd "${SCALE_DIR:-.scale}" && pwd)"
OUT="${OUT:-/tmp/scaling-out}"
mkdir -p "$OUT" /tmp/scale-bin
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "== $(date -u +%FT%TZ) $(uname -a); nproc $(nproc); python3 $(python3 -V 2>&1)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$S"/whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site
for b in wrk nginx redis-server; do
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/lib exec %s/bin/%s "$@"\n' "$S" "$S" "$b" > /tmp/scale-bin/$b
  chmod +x /tmp/scale-bin/$b
done
export PATH=/tmp/scale-bin:$PATH
SRC="${GATEWAY_SRC:-$PWD}"; [ -z "${GATEWAY_SRC:-}" ] && [ -d "$S/src/gateway" ] && SRC="$S/src"
SRC="$(cd "$SRC" && pwd)"; echo "gateway tree: $SRC $(cat "$SRC/COMMIT" 2>/dev/null || git -C "$SRC" rev-parse HEAD 2>/dev/null)"
wrk --version 2>&1 | head -1; nginx -v 2>&1; redis-server --version
echo "taskset: $(taskset -p $$ 2>&1)"
PYTHONPATH=/tmp/site:$SRC python3 -c "import gateway.app, gateway.serve, uvicorn, uvloop, aiohttp; print('imports ok')" \
  || { echo "gateway import failed"; exit 1; }
PYTHONUNBUFFERED=1 python3 "$here/bench_scaling.py" --perf "$S/perf" --repo "$SRC" --python python3 --out "$OUT" \
  --systems "${SYSTEMS:-bare-1w,bare-2w,mem-1w,mem-2w,redis-1w,redis-2w}" --modes "${MODES:-json,sse}" \
  --rounds "${ROUNDS:-2}" --duration "${DURATION:-8}" --warmup "${WARMUP:-2}" --conns "${CONNS:-128,64}" \
  --budget-s "${BUDGET_S:-430}" --hard-s "${HARD_S:-520}" --port-base "${PORT_BASE:-18000}"
echo "== done rc=$? $(date -u +%FT%TZ)"
