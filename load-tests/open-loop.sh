#!/usr/bin/env bash
# Serving benchmark with open-loop arrivals: the same fixed-rate mix of short
# answers, long answers and images (`ulm-load --scenario serving`) against two
# servers, one batching statically and one continuously, alternating at every
# rate. Prints throughput and p50/p99 per rate and the static / continuous
# ratios; the JSON reports stay in the output directory.
#
# The model is random weights of load-tests/serving-model.json: the demo with
# a 512-wide, 4-layer language model, large enough that a decode step costs
# about the same for one row as for several (as on a GPU), which is what
# batching exploits. MODEL=demo serves the demo model, whose steps cost in
# proportion to their rows on a CPU; MODEL=FILE another config.
#
#   load-tests/open-loop.sh                 # rates 4 8 16 24, 30 s each
#   RATES="4 8" DURATION=10 load-tests/open-loop.sh
#
# BIN=DIR runs the ulm-server and ulm-load binaries in DIR instead of
# building them, and SERVE_ARGS adds flags to both servers: the GPU
# runbook runs it as BIN=. SERVE_ARGS="--device cuda --dtype bf16".
set -euo pipefail
cd "$(dirname "$0")/.."

rates=${RATES:-"4 8 16 24"}
duration=${DURATION:-30}
out=${OUT:-$(mktemp -d /tmp/ulm-open-loop.XXXXXX)}
mkdir -p "$out"

bin=${BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked -q -p ulm-server -p ulm-load
  bin=target/release
fi
read -r -a serve_args <<<"${SERVE_ARGS:-}"

model=${MODEL:-load-tests/serving-model.json}
if [ "$model" = demo ]; then
  model_args=(--demo)
else
  "$bin/ulm-server" save-demo --out "$out/model" --config "$model" >/dev/null
  model_args=(--model "$out/model")
fi

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

declare -A port=([static]=18391 [continuous]=18392)
for mode in static continuous; do
  # A queue long enough that no arrival is refused: what is measured is
  # the time a request waits and computes, not how fast 429s come back.
  "$bin/ulm-server" serve "${model_args[@]}" "${serve_args[@]}" --no-auth --port "${port[$mode]}" \
    --data-dir "$out/data-$mode" --batching "$mode" --max-queue 100000 \
    --request-timeout-secs 900 >"$out/server-$mode.log" 2>&1 &
  pids+=($!)
done
for mode in static continuous; do
  for _ in $(seq 1 1200); do
    curl -fs "http://127.0.0.1:${port[$mode]}/readyz" >/dev/null && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:${port[$mode]}/readyz" >/dev/null ||
    { echo "the $mode server did not start; see $out/server-$mode.log" >&2; exit 1; }
done

for rate in $rates; do
  for mode in static continuous; do
    echo "== $mode batching, $rate requests/s for $duration s"
    "$bin/ulm-load" --url "http://127.0.0.1:${port[$mode]}" --scenario serving \
      --arrival-rate "$rate" --duration "$duration" \
      --report "$out/$mode-$rate.json" >"$out/load-$mode-$rate.log"
  done
done

python3 - "$out" "$model" $rates <<'EOF'
import json, sys
out, model, rates = sys.argv[1], sys.argv[2], sys.argv[3:]
ops = ["all", "answer_short", "answer_long", "generate"]
print(f"\nopen loop, model {model}, {len(rates)} rates; latency in ms (static / continuous = ratio)\n")
print("| rate req/s | op | static req/s | continuous req/s | static p50 | continuous p50 | p50 ratio | static p99 | continuous p99 | p99 ratio |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for rate in rates:
    r = {m: json.load(open(f"{out}/{m}-{rate}.json"))["operations"] for m in ("static", "continuous")}
    for op in ops:
        s, c = r["static"].get(op), r["continuous"].get(op)
        if not s or not c:
            continue
        ok = lambda x: x["ok"] / max(x["requests"], 1) * x["throughput_rps"]
        print(f"| {rate} | {op} | {ok(s):.2f} | {ok(c):.2f} | {s['p50_ms']:.0f} | {c['p50_ms']:.0f} | "
              f"{s['p50_ms'] / max(c['p50_ms'], 1e-9):.2f}x | {s['p99_ms']:.0f} | {c['p99_ms']:.0f} | "
              f"{s['p99_ms'] / max(c['p99_ms'], 1e-9):.2f}x |")
print(f"\nreports: {out}")
EOF
