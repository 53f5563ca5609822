#!/usr/bin/env bash
# Fair queue on one GPU: two tenants (heavy: HEAVY streams, light: 4 interactive streams) on one vLLM engine,
# direct vs gateway with the fair queue off vs on (SLOTS per replica, one gateway per value), interleaved.
# One device call, after the vLLM bundle is installed into /tmp/site (../shared/gpu/README.md).
#
#   bash scripts/gpu/fairness_h200.sh MODEL_DIR WHEEL_DIR
#
# MODEL_DIR: config + tokenizer of the model shape (weights are dummy: --load-format dummy); WHEEL_DIR: the
# gateway's wheels the image lacks (redis, joserfc). Env: SLOTS (64,128), HEAVY (256), ROUNDS (2), DURATION
# (20), RAMP (5), BUDGET (seconds after which the optional 64-stream pass is skipped; 400), OUT (results),
# FAIR_EXTRA (more fair_queue settings, e.g. ", fair_share_headroom_per_replica: 8, engine_priority: true"),
# VLLM_ARGS (more vLLM flags, e.g. "--scheduling-policy priority"), RUN (suffix of the result names).
set -uo pipefail
MODEL_DIR="${1:?model dir}"; WHEELS="${2:?wheel dir}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
RES="${OUT:-$ROOT/results}"; mkdir -p "$RES"
SLOTS="${SLOTS:-64,128}"; HEAVY="${HEAVY:-256}"; ROUNDS="${ROUNDS:-2}"; DURATION="${DURATION:-20}"; RAMP="${RAMP:-5}"
BUDGET="${BUDGET:-400}"
W=/tmp/fair; mkdir -p "$W"
EP=${ENGINE_PORT:-8000}; GP=${GATEWAY_PORT:-8080}
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
export PYTHONPATH="/tmp/site:$ROOT" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export NCCL_NVLS_ENABLE=0
MODEL=m7b
MODEL_DIR=$(cd "$MODEL_DIR" && pwd)
VOCAB=$(python3 -c "import json;print(json.load(open('$MODEL_DIR/config.json'))['vocab_size'])")
VLLM=$(python3 -c "import vllm;print(vllm.__version__)")
MACHINE="NVIDIA H200 (device tool nvidia-h200), vLLM $VLLM, 7B shape (30 layers, hidden 4096, vocab $VOCAB), dummy bf16 weights, CUDA graphs"
setsid python3 -m ${VLLM_MODULE:-vllm.entrypoints.cli.main serve} "$MODEL_DIR" --load-format dummy --served-model-name $MODEL \
  --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256 --port $EP ${VLLM_EXTRA:---gpu-memory-utilization 0.90} ${VLLM_ARGS:-} \
  > "$W/engine.log" 2>&1 < /dev/null &
PIDS=($!)

KH=sk-h200-heavy; KL=sk-h200-light
dig() { python3 -c "import hashlib;print(hashlib.sha256(b'$1').hexdigest())"; }
DH=$(dig $KH); DL=$(dig $KL)
gateway() {  # $1 port, $2 fair_queue yaml (flow style)
  cat > "$W/gw-$1.yaml" <<YAML
models:
  - name: $MODEL
    upstreams: ["http://127.0.0.1:$EP"]
api_keys:
  - {id: heavy, sha256: $DH, tenant: heavy, models: ["*"]}
  - {id: light, sha256: $DL, tenant: light, models: ["*"]}
health_interval: 1.0
metrics_port: 0
fair_queue: $2
YAML
  GATEWAY_CONFIG="$W/gw-$1.yaml" GATEWAY_PORT=$1 GATEWAY_LOG_LEVEL=warning setsid python3 -m gateway serve \
    > "$W/gw-$1.log" 2>&1 < /dev/null &
  PIDS+=($!)
}
gateway $GP "{enabled: false}"
TARGETS=(--target "direct=http://127.0.0.1:$EP/v1" --target "fair-off=http://127.0.0.1:$GP/v1,$KH,$KL")
port=$((GP + 1))
for n in ${SLOTS//,/ }; do
  gateway $port "{enabled: true, slots_per_replica: $n, classes: {interactive: {rank: 0, max_wait: 120}, batch: {rank: 1, max_wait: 600, engine_priority: 10}}${FAIR_EXTRA:-}}"
  TARGETS+=(--target "fair-on-N$n=http://127.0.0.1:$port/v1,$KH,$KL")
  port=$((port + 1))
done
for i in $(seq 1 600); do curl -sf http://127.0.0.1:$EP/health >/dev/null && break; sleep 1; done
curl -sf http://127.0.0.1:$EP/health >/dev/null || { tail -40 "$W/engine.log"; exit 1; }
echo "engine ready after $(( $(date +%s) - T0 )) s"
for p in $(seq $GP $((port - 1))); do curl -sf "http://127.0.0.1:$p/readyz" >/dev/null || { echo "gateway $p not ready"; tail -20 "$W/gw-$p.log"; }; done
# Warm-up (CUDA graphs, allocator): a few requests straight to the engine.
python3 scripts/bench_fairness.py --model $MODEL --vocab "$VOCAB" --target "warm=http://127.0.0.1:$EP/v1" \
  --heavy-streams 32 --light-streams 1 --duration 4 --ramp 1 --rounds 1 --out "$W/warm" --name warm > /dev/null 2>&1
python3 scripts/bench_fairness.py --model $MODEL --vocab "$VOCAB" "${TARGETS[@]}" --heavy-streams "$HEAVY" --light-streams 4 \
  --duration "$DURATION" --ramp "$RAMP" --rounds "$ROUNDS" --engine-metrics http://127.0.0.1:$EP/metrics \
  --name "h200_fairness_${HEAVY}${RUN:-}" --title "Heavy $HEAVY streams + light 4 interactive streams, one engine" \
  --machine "$MACHINE" --out "$RES" 2>&1 | grep -v '^{'
if [ $(( $(date +%s) - T0 )) -lt "$BUDGET" ]; then
  first=${SLOTS%%,*}
  python3 scripts/bench_fairness.py --model $MODEL --vocab "$VOCAB" --target "direct=http://127.0.0.1:$EP/v1" \
    --target "fair-off=http://127.0.0.1:$GP/v1,$KH,$KL" --target "fair-on-N$first=http://127.0.0.1:$((GP + 1))/v1,$KH,$KL" \
    --heavy-streams 64 --light-streams 4 --duration 15 --ramp 4 --rounds 1 --engine-metrics http://127.0.0.1:$EP/metrics \
    --name "h200_fairness_64${RUN:-}" --title "Heavy 64 streams + light 4 interactive streams, one engine" \
    --machine "$MACHINE" --out "$RES" 2>&1 | grep -v '^{'
else
  echo "skipped the 64-stream pass (time)"
fi
for p in $(seq $((GP + 1)) $((port - 1))); do
  curl -s "http://127.0.0.1:$p/metrics" | grep -E "^llm_gateway_fair_(shed|slots|slot_hold)" | head -8
done
grep -E "Maximum concurrency|KV cache|num_gpu_blocks" "$W/engine.log" | head -3
echo "total $(( $(date +%s) - T0 )) s"
grep -v '"GET /\|"POST /' "$W/engine.log" | tail -c 2000000 > "$RES/engine_fairness.log"
# Stop what this script started (on the device machine everything goes with it anyway).
kill "${PIDS[@]}" 2>/dev/null; true
