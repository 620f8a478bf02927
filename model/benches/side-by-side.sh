#!/usr/bin/env bash
# Ours against transformers' Janus on the same random checkpoint, the same
# inputs and the same machine, one side after the other: prefill, decode
# tokens/s, image tokens/s, VQ decode and seconds per image as ratios, and
# whether both give the same greedy tokens.
#
#   model/benches/side-by-side.sh                         # small preset, CPU, f32
#   model/benches/side-by-side.sh --preset 1b --layers 4  # Janus-Pro-1B widths
#   DEVICE=cuda DTYPE=bf16 model/benches/side-by-side.sh --preset 1b --decode-batches 1,16 --image-batches 1,16
#
# Other arguments go to the Rust half (model/benches/side_by_side.rs).
# PYTHON names an interpreter with torch, transformers and safetensors
# (default python3); DIR keeps the checkpoint and the JSON results.
set -euo pipefail
cd "$(dirname "$0")/../.."

py=${PYTHON:-python3}
device=${DEVICE:-cpu}
dtype=${DTYPE:-f32}
dir=${DIR:-$(mktemp -d /tmp/ulm-side-by-side.XXXXXX)}
"$py" -c "import torch, transformers, safetensors" 2>/dev/null ||
  { echo "$py needs torch, transformers and safetensors (pip install torch transformers safetensors)" >&2; exit 1; }

features=()
[ "$device" = cuda ] && features=(--features cuda)
cargo bench -q --locked -p ulm-model "${features[@]}" --bench side_by_side -- \
  --dir "$dir" --device "$device" --dtype "$dtype" "$@"
"$py" model/benches/side_by_side.py "$dir" --device "$device" --dtype "$dtype"
