#!/usr/bin/env bash
# The whole stack on one GPU machine, in phases (each fits one device call; processes started with setsid
# live on between calls of the same lease). Run from the repo root after the vLLM bundle is installed into
# /tmp/site (../shared/gpu/README.md) and our extra wheels are in .whl/.
#
#   setup: S3 server → make a Llama-shaped model (random weights) → llm-engine push → llm-engine run from s3://
#          (pull + verify + vLLM with CUDA graphs) → gateways (auth + quotas + audit; 1 and 4 workers)
#   bench: direct vs gateway, interleaved, at $CONC streams
#   eager / fp8: restart the engine with CUDA graphs off / with FP8, and bench the same way
#
# Env: SHAPE (1b), CONC (1,64,256), PROMPT (512), OUTPUT (256), OUT (results dir; the device tool's $OUT).
set -uo pipefail
PHASE="${1:?setup|bench|eager|fp8}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
SHAPE="${SHAPE:-1b}"; CONC="${CONC:-1,64,256}"; PROMPT="${PROMPT:-512}"; OUTPUT="${OUTPUT:-256}"
RES="${OUT:-$ROOT/results}"; mkdir -p "$RES"
W=/tmp/stack; mkdir -p "$W/logs"
export PYTHONPATH="/tmp/site:$ROOT" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export NCCL_NVLS_ENABLE=0
export S3_ENDPOINT_URL=http://127.0.0.1:9100 AWS_ACCESS_KEY_ID=gpu-bench AWS_SECRET_ACCESS_KEY=gpu-bench-secret-key AWS_REGION=us-east-1
MODEL="llama-$SHAPE"; KEY="sk-h200-bench-key"
MACHINE="NVIDIA H200 (device tool nvidia-h200), vLLM 0.24.0, torch $(python3 -c 'import torch;print(torch.__version__)' 2>/dev/null)"
ts() { date +%s.%N; }
wait_url() { for i in $(seq 1 "$2"); do curl -sf "$1" >/dev/null && return 0; sleep 1; done; echo "timeout waiting for $1"; return 1; }

start_engine() {  # $1 = tag, rest = extra env assignments
  local tag="$1"; shift
  pkill -f "engine run" 2>/dev/null; sleep 3
  local t0; t0=$(ts)
  env ENGINE_MODEL="s3://models/$MODEL" ENGINE_SERVED_MODEL_NAME="$MODEL" ENGINE_PORT=8000 ENGINE_CACHE_DIR=/tmp/cache \
      ENGINE_DTYPE=bfloat16 ENGINE_MAX_MODEL_LEN=2048 ENGINE_MAX_NUM_SEQS=256 ENGINE_GPU_MEMORY_UTILIZATION=0.85 "$@" \
      setsid python3 -m engine run > "$W/logs/engine-$tag.log" 2>&1 < /dev/null &
  wait_url http://127.0.0.1:8000/health 600 || { tail -50 "$W/logs/engine-$tag.log"; return 1; }
  echo "engine[$tag] ready after $(python3 -c "print(round($(ts)-$t0,1))") s"
  grep -E "pull|verified|MB/s|cache" "$W/logs/engine-$tag.log" | head -8
  grep -o "\-\-enforce-eager\|\-\-quantization fp8" "$W/logs/engine-$tag.log" | sort | uniq -c
}

bench() {  # $1 = name, $2 = title
  python3 scripts/bench_e2e.py --model "$MODEL" --vocab 4000 --concurrency "$CONC" --prompt-tokens "$PROMPT" \
    --max-tokens "$OUTPUT" --rounds 2 --name "$1" --title "$2" --machine "$MACHINE" --out "$RES" \
    --target direct=http://127.0.0.1:8000/v1 --target "gateway=http://127.0.0.1:8080/v1,$KEY" \
    --target "gateway-4w=http://127.0.0.1:8081/v1,$KEY" 2>&1 | grep -v "^{" | tail -20
}

if [ "$PHASE" = setup ]; then
  [ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  NANIO_ACCESS_KEY=$AWS_ACCESS_KEY_ID NANIO_SECRET_KEY=$AWS_SECRET_ACCESS_KEY setsid python3 -m nanio serve --host 127.0.0.1 \
    --port 9100 --data-dir /tmp/s3 --no-access-log --log-level warning > "$W/logs/s3.log" 2>&1 < /dev/null &
  t0=$(ts); python3 -m engine make-test-model "/tmp/models/$MODEL" --shape "$SHAPE" || exit 1
  echo "model built in $(python3 -c "print(round($(ts)-$t0,1))") s: $(du -sh /tmp/models/$MODEL | cut -f1)"
  wait_url http://127.0.0.1:9100/ 30 || true
  python3 -c "
from minio import Minio
c = Minio('127.0.0.1:9100', access_key='$AWS_ACCESS_KEY_ID', secret_key='$AWS_SECRET_ACCESS_KEY', secure=False, region='us-east-1')
c.bucket_exists('models') or c.make_bucket('models')"
  t0=$(ts); python3 -m engine push "/tmp/models/$MODEL" "s3://models/$MODEL" --no-progress 2>&1 | tail -3
  echo "push took $(python3 -c "print(round($(ts)-$t0,1))") s"
  start_engine graphs || exit 1
  # The gateway with auth (API key), quotas (in-process, generous limits) and audit (file, fsync batching).
  DIGEST=$(python3 -c "import hashlib;print(hashlib.sha256(b'$KEY').hexdigest())")
  for port in 8080 8081; do
    cat > "$W/gateway-$port.yaml" <<YAML
models:
  - name: $MODEL
    upstreams: ["http://127.0.0.1:8000"]
api_keys:
  - {id: bench, sha256: $DIGEST, tenant: bench, models: ["*"]}
quota:
  enabled: true
  default: {requests_per_minute: 1000000, tokens_per_minute: 1000000000, max_concurrent: 10000}
audit:
  enabled: true
  sink: file
  path: $W/audit-$port/audit-{pid}.jsonl
YAML
  done
  GATEWAY_CONFIG="$W/gateway-8080.yaml" GATEWAY_PORT=8080 GATEWAY_LOG_LEVEL=warning setsid python3 -m gateway serve > "$W/logs/gw-8080.log" 2>&1 < /dev/null &
  GATEWAY_CONFIG="$W/gateway-8081.yaml" GATEWAY_PORT=8081 GATEWAY_WORKERS=4 GATEWAY_LOG_LEVEL=warning setsid python3 -m gateway serve > "$W/logs/gw-8081.log" 2>&1 < /dev/null &
  wait_url http://127.0.0.1:8080/readyz 60 || { tail -30 "$W/logs/gw-8080.log"; exit 1; }
  wait_url http://127.0.0.1:8081/readyz 60 || { tail -30 "$W/logs/gw-8081.log"; exit 1; }
  cp "$W"/logs/engine-graphs.log "$RES/engine-graphs.log" 2>/dev/null
elif [ "$PHASE" = bench ]; then
  bench h200_graphs "CUDA graphs on (default), bf16"
  echo "audit records written by the 1-worker gateway: $(cat "$W"/audit-8080/*.jsonl* 2>/dev/null | wc -l)"
  python3 -m gateway audit verify "$W"/audit-8080 2>&1 | tail -2
  curl -s http://127.0.0.1:8080/metrics | grep -E "^llm_gateway_(requests_total|completion_tokens_total)" | head -5
elif [ "$PHASE" = eager ]; then
  start_engine eager ENGINE_ENFORCE_EAGER=true || exit 1
  bench h200_eager "CUDA graphs off (ENGINE_ENFORCE_EAGER=true), bf16"
elif [ "$PHASE" = fp8 ]; then
  start_engine fp8 ENGINE_QUANTIZATION=fp8 || exit 1
  bench h200_fp8 "FP8 (ENGINE_QUANTIZATION=fp8), CUDA graphs on"
fi
