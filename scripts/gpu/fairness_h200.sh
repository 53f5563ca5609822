#!/usr/bin/env bash
# The fair queue on one GPU, sized from the knee of the engine's throughput curve. For each engine
# configuration in ENGINES, one vLLM engine (7B shape, dummy weights):
#   1. the throughput-vs-concurrency curve: one tenant alone, direct, at each of CURVE streams;
#   2. N from the curve: N_lat, the largest N whose per-stream rate still gives the light tenant LIGHT_GOAL
#      tok/s, and N_thr, the smallest N whose total reaches SHARE_GOAL of the curve's last point (the engine
#      runs N + the light streams, which take headroom slots); SLOTS overrides them;
#   3. two tenants (heavy: HEAVY streams, light: 4 interactive streams), direct vs the gateway's fair queue at
#      each N, interleaved (scripts/bench_fairness.py); the first configuration also at 64 heavy streams
#      (direct and the first N).
#
#   bash scripts/gpu/fairness_h200.sh MODEL_DIR [WHEEL_DIR]
#
# Runs after the vLLM bundle is installed into /tmp/site (../shared/gpu/README.md). MODEL_DIR: config and
# tokenizer of the model shape (engine/testmodel.py --shape 7b --no-weights); WHEEL_DIR: wheels the gateway
# needs that the image lacks. Env: ENGINES ("name=vLLM flags;..."; default "bf16=;fp8kv=--kv-cache-dtype fp8"),
# CURVE (64,96,128,160,192,256; empty: none), CURVE_DURATION (10), HEAVY (256), DURATION (40), ROUNDS (3), LATER_DURATION
# (25) and LATER_ROUNDS (1) for the configurations after the first, LIGHT_GOAL (216), SHARE_GOAL (0.95), SLOTS
# (fixed N list), GW_WORKERS (gateway worker processes, a list: one gateway per N and count; 1), SKIP64 (no
# 64-stream pass), HEADROOM (8), DEADLINE (seconds from the start; a step that would end later is skipped),
# OUT (results directory), PY (python), ENGINE_CMD (replaces vLLM, for a dry run with scripts/sim_upstream.py).
# Writes DONE into $W (/tmp/fair) when finished.
set -uo pipefail
MODEL_DIR="${1:?model dir}"; WHEELS="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
RES="${OUT:-$ROOT/results}"; mkdir -p "$RES"
PY="${PY:-python3}"
ENGINES="${ENGINES:-bf16=;fp8kv=--kv-cache-dtype fp8}"
CURVE="${CURVE-64,96,128,160,192,256}"; CURVE_DURATION="${CURVE_DURATION:-10}"
HEAVY="${HEAVY:-256}"; DURATION="${DURATION:-40}"; ROUNDS="${ROUNDS:-3}"; RAMP="${RAMP:-5}"
LATER_DURATION="${LATER_DURATION:-25}"; LATER_ROUNDS="${LATER_ROUNDS:-1}"
LIGHT=4; LIGHT_GOAL="${LIGHT_GOAL:-216}"; SHARE_GOAL="${SHARE_GOAL:-0.95}"; HEADROOM="${HEADROOM:-8}"
DEADLINE="${DEADLINE:-100000}"; GW_WORKERS="${GW_WORKERS:-1}"
W=/tmp/fair; mkdir -p "$W"; rm -f "$W/DONE"
EP=${ENGINE_PORT:-8000}; GP=${GATEWAY_PORT:-8080}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
# fits S: would a step of S seconds end before the deadline?
fits() { [ $(( $(date +%s) - T0 + $1 )) -le "$DEADLINE" ]; }
if [ -n "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$ROOT" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
MODEL=m7b
MODEL_DIR=$(cd "$MODEL_DIR" && pwd)
VOCAB=$($PY -c "import json;print(json.load(open('$MODEL_DIR/config.json'))['vocab_size'])")
VLLM=$($PY -c "import vllm;print(vllm.__version__)" 2>/dev/null || echo "none")
KH=sk-h200-heavy; KL=sk-h200-light
dig() { $PY -c "import hashlib;print(hashlib.sha256(b'$1').hexdigest())"; }
DH=$(dig $KH); DL=$(dig $KL)
BENCH=("$PY" scripts/bench_fairness.py --model $MODEL --vocab "$VOCAB" --ramp "$RAMP" --engine-metrics "http://127.0.0.1:$EP/metrics")
GWS=()

start_engine() {  # $1 name, $2 extra vLLM flags
  if [ -n "${ENGINE_CMD:-}" ]; then
    setsid $ENGINE_CMD --port $EP > "$W/engine-$1.log" 2>&1 < /dev/null &
  else
    setsid $PY -m vllm.entrypoints.cli.main serve "$MODEL_DIR" --load-format dummy --served-model-name $MODEL \
      --dtype bfloat16 --max-model-len 2048 --max-num-seqs 256 --gpu-memory-utilization 0.90 \
      --scheduling-policy priority --port $EP $2 > "$W/engine-$1.log" 2>&1 < /dev/null &
  fi
  ENGINE_PID=$!
  for _ in $(seq 1 600); do curl -sf http://127.0.0.1:$EP/health >/dev/null && break; sleep 1; done
  curl -sf http://127.0.0.1:$EP/health >/dev/null || { tail -40 "$W/engine-$1.log"; return 1; }
  log "engine $1 ready"
  grep -hE "Asynchronous scheduling|Maximum concurrency|GPU KV cache size|non-default args" "$W/engine-$1.log" | cut -c1-400
  # Warm-up (CUDA graphs, allocator): a few requests straight to the engine.
  "${BENCH[@]}" --target "warm=http://127.0.0.1:$EP/v1" --heavy-streams 32 --light-streams 1 --duration 4 \
    --ramp 1 --rounds 1 --out "$W/warm" --name warm > /dev/null 2>&1
}

stop_all() {  # gateways at once (nothing in flight: no drain needed), the engine gracefully
  for p in "${GWS[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
  [ -n "${ENGINE_PID:-}" ] && kill -TERM -- "-$ENGINE_PID" 2>/dev/null
  for _ in $(seq 1 60); do
    alive=0; for p in "${GWS[@]}" ${ENGINE_PID:-}; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 1
  done
  for p in "${GWS[@]}" ${ENGINE_PID:-}; do kill -KILL -- "-$p" 2>/dev/null; done
  GWS=(); ENGINE_PID=
  # The next engine needs the GPU's memory back.
  for _ in $(seq 1 30); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)
    [ -z "$used" ] || [ "$used" -lt 2000 ] && break; sleep 1
  done
}
trap 'stop_all; touch "$W/DONE"' EXIT

gateway() {  # $1 port, $2 fair_queue yaml (flow style), $3 worker processes
  cat > "$W/gw-$1.yaml" <<YAML
models:
  - name: $MODEL
    upstreams: ["http://127.0.0.1:$EP"]
api_keys:
  - {id: heavy, sha256: $DH, tenant: heavy, models: ["*"]}
  - {id: light, sha256: $DL, tenant: light, models: ["*"]}
health_interval: 1.0
metrics_port: 0
workers: ${3:-1}
fair_queue: $2
YAML
  GATEWAY_CONFIG="$W/gw-$1.yaml" GATEWAY_PORT=$1 GATEWAY_LOG_LEVEL=warning setsid $PY -m gateway serve \
    > "$W/gw-$1.log" 2>&1 < /dev/null &
  GWS+=($!)
}

choose_n() {  # $1 curve json -> "N_lat N_thr"
  $PY - "$1" "$LIGHT_GOAL" "$LIGHT" "$SHARE_GOAL" <<'PY'
import json, math, sys
d = json.load(open(sys.argv[1])); goal, light, share = float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = sorted(d["curve"], key=lambda r: r["streams"])
xs = [r["streams"] for r in c]; per = [r["per_stream_tok_s"] for r in c]; tot = [r["total_tok_s"] or 0 for r in c]
def lat():  # the largest batch whose per-stream rate still gives the light tenant its goal
    g = goal / light
    if per[0] < g:
        return xs[0]
    for i in range(1, len(xs)):
        if per[i] < g:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (per[i - 1] - g) / (per[i - 1] - per[i])
    return xs[-1]
def thr():  # the smallest batch whose total reaches share x the last point's
    y = share * tot[-1]
    if tot[0] >= y:
        return xs[0]
    for i in range(1, len(xs)):
        if tot[i] >= y:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * (y - tot[i - 1]) / (tot[i] - tot[i - 1])
    return xs[-1]
b_lat, b_thr = lat(), thr()
cap = xs[-1] - 8
n_lat = max(8, min(cap, int((b_lat - light) // 8 * 8)))
n_thr = max(8, min(cap, int(math.ceil((b_thr - light) / 8) * 8)))
print(n_lat, n_thr)
PY
}

first=1
IFS=';' read -ra CONFIGS <<< "$ENGINES"
for cfg in "${CONFIGS[@]}"; do
  name=${cfg%%=*}; flags=${cfg#*=}
  fits 240 || { log "skipped engine $name (time)"; continue; }
  MACHINE="NVIDIA H200 (device tool nvidia-h200), vLLM $VLLM, 7B shape (30 layers, hidden 4096, vocab $VOCAB), dummy bf16 weights, CUDA graphs, --max-num-seqs 256, --scheduling-policy priority${flags:+, $flags}"
  start_engine "$name" "$flags" || { stop_all; continue; }
  n_levels=$(echo "$CURVE" | tr ',' ' ' | wc -w)
  if [ -n "$CURVE" ] && fits $(( n_levels * (CURVE_DURATION + RAMP + 4) )); then
    log "curve"
    "${BENCH[@]}" --target "direct=http://127.0.0.1:$EP/v1" --curve "$CURVE" --duration "$CURVE_DURATION" \
      --rounds 1 --name "h200_curve_$name" --title "Throughput vs concurrency, one tenant, direct ($name)" \
      --machine "$MACHINE" --out "$RES" 2>&1 | grep -v '^{'
  fi
  if [ -n "${SLOTS:-}" ]; then
    ns=${SLOTS//,/ }
  elif [ -f "$RES/h200_curve_$name.json" ]; then
    ns=$(choose_n "$RES/h200_curve_$name.json"); log "N from the curve (N_lat N_thr): $ns"
  else
    ns="128"
  fi
  ns=$(echo $ns | tr ' ' '\n' | sort -nu | tr '\n' ' ')
  TARGETS=(--target "direct=http://127.0.0.1:$EP/v1")
  port=$((GP + 1))
  for n in $ns; do
    for w in ${GW_WORKERS//,/ }; do
      gateway $port "{enabled: true, slots_per_replica: $n, fair_share_headroom_per_replica: $HEADROOM, engine_priority: true, classes: {interactive: {rank: 0, max_wait: 120}, batch: {rank: 1, max_wait: 600, engine_priority: 10}}}" "$w"
      TARGETS+=(--target "fair-on-N$n$([ "$w" = 1 ] || echo "-w$w")=http://127.0.0.1:$port/v1,$KH,$KL")
      port=$((port + 1))
    done
  done
  sleep 4
  for p in $(seq $((GP + 1)) $((port - 1))); do
    for _ in $(seq 1 30); do curl -sf "http://127.0.0.1:$p/readyz" >/dev/null && break; sleep 1; done
    curl -sf "http://127.0.0.1:$p/readyz" >/dev/null || { log "gateway $p not ready"; tail -20 "$W/gw-$p.log"; }
  done
  dur=$DURATION; rounds=$ROUNDS
  [ $first = 1 ] || { dur=$LATER_DURATION; rounds=$LATER_ROUNDS; }
  ntargets=$(( ${#TARGETS[@]} / 2 ))
  while [ "$rounds" -gt 1 ] && ! fits $(( rounds * ntargets * (dur + RAMP + 4) )); do rounds=$((rounds - 1)); done
  if fits $(( rounds * ntargets * (dur + RAMP + 4) )); then
    log "$HEAVY heavy streams: $ntargets targets x $rounds rounds of $dur s"
    "${BENCH[@]}" "${TARGETS[@]}" --heavy-streams "$HEAVY" --light-streams $LIGHT --duration "$dur" --rounds "$rounds" \
      --name "h200_fairness_${HEAVY}_$name" --title "Heavy $HEAVY streams + light $LIGHT interactive streams, one engine ($name)" \
      --machine "$MACHINE" --out "$RES" 2>&1 | grep -v '^{'
  else
    log "skipped the $HEAVY-stream comparison of $name (time)"
  fi
  if [ $first = 1 ] && [ -z "${SKIP64:-}" ] && fits $(( 2 * (20 + RAMP + 4) )); then
    log "64 heavy streams"
    "${BENCH[@]}" "${TARGETS[@]:0:4}" --heavy-streams 64 --light-streams $LIGHT --duration 20 --rounds 1 \
      --name "h200_fairness_64_$name" --title "Heavy 64 streams + light $LIGHT interactive streams, one engine ($name)" \
      --machine "$MACHINE" --out "$RES" 2>&1 | grep -v '^{'
  fi
  for p in $(seq $((GP + 1)) $((port - 1))); do
    curl -s "http://127.0.0.1:$p/metrics" | grep -E "^llm_gateway_fair_(shed|slots|slot_hold)" | head -6
  done
  grep -v '"GET /\|"POST /' "$W/engine-$name.log" | tail -c 1000000 > "$RES/engine_$name.log"
  stop_all
  log "engine $name stopped"
  first=0
done
log "done"
