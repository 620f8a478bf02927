#!/usr/bin/env bash
# Builds the CUDA binaries on a machine with no GPU and no CUDA toolkit, from
# NVIDIA's wheels on PyPI: the server, the side-by-side, model and GRPO-step
# benchmarks and the parity tests, stripped, into one folder that
# gpu/runbook.sh runs on a GPU machine.
#
#   gpu/build-cuda.sh                  # CUDA 13.0, compute capability 9.0 (H100, H200)
#   CUDA_COMPUTE_CAP=80 gpu/build-cuda.sh
#   gpu/build-cuda.sh --check          # only type-check every target with the cuda feature
#                                      # (candle's kernels still go through nvcc): what CI runs
#
# The toolkit is pinned to CUDA 13.0: the GPU machines this project is lent
# run driver 580 (CUDA 13.0), and a driver loads only PTX from an nvcc no
# newer than itself. candle compiles its kernels to PTX for
# CUDA_COMPUTE_CAP, which the driver compiles on first use. The binaries
# link the CUDA libraries dynamically (libcuda.so.1, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13): the driver brings
# the first, a CUDA 13 toolkit or PyTorch's wheels the others.
#
# Output: OUT (default target/gpu-bundle), the same folder as OUT.tar.xz
# (what to carry: under 64 MiB) and a log of the build beside it.
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=false
[ "${1:-}" = --check ] && check_only=true
compute_cap=${CUDA_COMPUTE_CAP:-90}
toolkit=${TOOLKIT:-$PWD/target/cuda-toolkit}
out=${OUT:-$PWD/target/gpu-bundle}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}

# CUDA 13.0 pieces: compiler (nvcc, its front end nvvm and crt headers),
# runtime headers and the C++ library headers they include; for linking,
# the three libraries candle links (not needed to type-check).
compiler_wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
library_wheels=(
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
wheels=("${compiler_wheels[@]}")
$check_only || wheels+=("${library_wheels[@]}")
root=$toolkit/nvidia/cu13
mkdir -p "$toolkit/wheels"
python3 -m pip download -q --no-deps --disable-pip-version-check -d "$toolkit/wheels" "${wheels[@]}"
for wheel in "$toolkit"/wheels/*.whl; do
  if [ ! -e "$wheel.unpacked" ]; then
    python3 -m zipfile -e "$wheel" "$toolkit"
    touch "$wheel.unpacked"
  fi
done
chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_COMPUTE_CAP=$compute_cap
export PATH=$root/bin:$PATH

if $check_only; then
  cargo check --locked --all-targets -p ulm-server -p ulm-rl -p ulm-model \
    --features ulm-server/cuda,ulm-rl/cuda,ulm-model/cuda
  exit
fi

# The linker wants unversioned names, and a libcuda.so to resolve the
# driver's symbols against: a stub with every entry point cudarc declares,
# named libcuda.so.1 so that the real driver is loaded at run time (as the
# toolkit's own lib/stubs/libcuda.so does).
links=$toolkit/link
mkdir -p "$links"
for lib in "$root"/lib/libcublas.so.* "$root"/lib/libcublasLt.so.* "$root"/lib/libcurand.so.* \
  "$root"/lib/libnvrtc.so.* "$root"/lib/libcudart.so.*; do
  name=$(basename "$lib")
  ln -sf "$lib" "$links/${name%%.so.*}.so"
done
cargo fetch --locked -q
cudarc=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -type d -name 'cudarc-*' | sort | tail -1)
grep -ohE 'pub (unsafe )?fn cu[A-Za-z0-9_]*' "$cudarc/src/driver/sys/mod.rs" | awk '{print $NF}' | sort -u |
  sed 's/.*/int &(void) { return 999; }/' >"$links/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/libcuda_stub.c"

export RUSTFLAGS="${RUSTFLAGS:-} -L native=$links"
log=$out.log
mkdir -p "$out"
{
  echo "nvcc: $(nvcc --version | tail -2 | tr '\n' ' ')"
  echo "compute capability: $compute_cap"
  cargo build --release --locked -p ulm-server --features cuda --bin ulm-server
  cargo bench --locked -p ulm-model --features cuda --no-run --bench side_by_side --bench model
  cargo bench --locked -p ulm-rl --features cuda --no-run --bench memory
  cargo build --release --locked -p ulm-load
  cargo test --release --locked -p ulm-model --features cuda --no-run --test parity
} 2>&1 | tee "$log"

# The newest build of each binary, stripped.
cp "$CARGO_TARGET_DIR/release/ulm-server" "$CARGO_TARGET_DIR/release/ulm-load" "$out/"
for name in side_by_side model memory parity; do
  bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/"$name"-* | grep -v '\.d$' | head -1)
  cp "$bin" "$out/$name"
done
strip "$out"/*
cp model/benches/side_by_side.py gpu/runbook.sh "$out/"
cp -r tests/fixtures "$out/fixtures"
mkdir -p "$out/load-tests"
cp load-tests/open-loop.sh load-tests/serving-model.json "$out/load-tests/"
# Each binary holds candle's PTX (text, the same in all five): xz with a
# dictionary larger than one binary stores it about once.
archive=$out.tar.xz
tar -C "$(dirname "$out")" -cf - "$(basename "$out")" | xz -T0 -9 >"$archive"
size=$(stat -c %s "$archive")
echo "built $out ($(du -sh "$out" | cut -f1)); $archive is $((size >> 20)) MiB; log $log"
if [ "$size" -gt $((64 << 20)) ]; then
  echo "the archive is over 64 MiB, more than the device tool carries" >&2
  exit 1
fi
