#!/usr/bin/env bash
# The GPU checks in one command, run inside the folder gpu/build-cuda.sh
# writes (carry it to the GPU machine; it needs the NVIDIA driver, the CUDA
# 13 libraries of a toolkit or of PyTorch's wheels, and python3 with torch,
# transformers and safetensors):
#
#   bash runbook.sh [RESULTS]          # RESULTS: where reports go (default ./results)
#   STEPS="parity open-loop" bash runbook.sh   # only the steps named (a prefix each)
#
# Every step together takes longer than one call of a lent machine may
# (10 minutes): run it as two, STEPS="parity side-by-side weight" (the
# weight-read limit reads the 1B side-by-side's timings) then
# STEPS="model grpo open-loop".
#
# 1. The parity suite on CUDA in f32, at the fixtures' tolerances.
# 2. Side by side with transformers' Janus on the same GPU and the same
#    random checkpoint: the small preset in f32 (a second parity check:
#    greedy tokens and VQ pixels), and the Janus-Pro-1B widths in bf16 at
#    batch 1 and 16 (prefill, decode tokens/s, image tokens/s, VQ decode,
#    seconds per image).
# 3. The model benchmark in bf16 (tokens/s by batch size).
# 4. One GRPO step at the Janus-Pro-1B widths (24 layers) in bf16, LoRA and
#    full, at 2 and 8 rows per group: seconds per step.
# 5. The open-loop serving benchmark, static against continuous batching,
#    on the GPU in bf16 (load-tests/open-loop.sh): p50/p99 and throughput
#    at rates up to and past the point where static batching saturates.
# 6. The weight-read limit of a decode step: bytes of weights over the
#    memory bandwidth the GPU measures here.
set -uo pipefail
cd "$(dirname "$0")"
results=${1:-results}
mkdir -p "$results"
status=0
selected() {
  [ -z "${STEPS:-}" ] && return 0
  local step
  for step in $STEPS; do
    [[ $1 == "$step"* ]] && return 0
  done
  return 1
}
run() {
  local name=$1
  shift
  selected "$name" || return 0
  echo "== $name"
  if "$@" >"$results/$name.log" 2>&1; then
    tail -25 "$results/$name.log"
  else
    echo "$name failed (exit $?); see $results/$name.log"
    tail -40 "$results/$name.log"
    status=1
  fi
}

# The CUDA 13 libraries: PyTorch's wheels when no toolkit is on the path.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)
for dir in "$site"/nvidia/cu13/lib "$site"/nvidia/*/lib /usr/local/cuda/lib64; do
  [ -d "$dir" ] && LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$results/device.txt"

JANUS_FIXTURES=$PWD/fixtures/janus REWARD_FIXTURES=$PWD/fixtures/rewards ULM_TEST_DEVICE=cuda \
  run parity ./parity --test-threads 1

run side-by-side-small-f32 bash -c "./side_by_side --dir '$results/small-f32' --device cuda --dtype f32 \
  --repeats 3 && python3 side_by_side.py '$results/small-f32' --device cuda --dtype f32"
run side-by-side-1b-bf16 bash -c "./side_by_side --dir '$results/1b-bf16' --preset 1b --layers 24 \
  --device cuda --dtype bf16 --repeats 5 --decode-batches 1,16 --image-batches 1,16 \
  && python3 side_by_side.py '$results/1b-bf16' --device cuda --dtype bf16"

run model-bench-bf16 ./model --device cuda --dtype bf16
run grpo-step-1b-bf16 ./memory --device cuda --dtype bf16 --layers 24 --rows 2,8 --quick
run open-loop-bf16 env BIN=. OUT="$results/open-loop" SERVE_ARGS="--device cuda --dtype bf16" \
  RATES="${OPEN_LOOP_RATES:-8 16 32 64 128}" DURATION="${OPEN_LOOP_DURATION:-15}" \
  bash load-tests/open-loop.sh

# Weight-read limit: a decode step reads every weight once, so at batch 1
# it cannot beat (bytes of weights) / (bandwidth).
run weight-read-limit python3 - "$results/1b-bf16" <<'EOF'
import json, os, sys, torch
d = sys.argv[1]
n = 2 << 30
x = torch.empty(n, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(10):
    y.copy_(x)
end.record()
torch.cuda.synchronize()
bandwidth = 2 * n * 10 / (start.elapsed_time(end) / 1000)  # read + write
weights = os.path.getsize(os.path.join(d, "model.safetensors")) / 2  # f32 file, served in bf16
ours = json.load(open(os.path.join(d, "ours.json")))["timings"]
ref = json.load(open(os.path.join(d, "reference.json")))["timings"]
limit = weights / bandwidth
print(f"bandwidth {bandwidth / 1e12:.2f} TB/s, weights {weights / 1e9:.2f} GB (bf16): "
      f"a decode step takes at least {limit * 1e3:.2f} ms")
for side, t in (("ours", ours), ("transformers", ref)):
    step = 1 / t["decode_tokens_per_s_b1"]
    print(f"{side}: {step * 1e3:.2f} ms per decode step at batch 1, {limit / step:.0%} of the limit")
EOF

exit $status
