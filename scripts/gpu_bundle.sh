#!/usr/bin/env bash
# Builds tinybit's GPU test and benchmark binaries here (a machine with Rust and the CUDA toolkit,
# no GPU needed) and packs them for scripts/gpu_check.sh on a CUDA machine that has no Rust
# toolchain: stripped, xz-compressed (~45 MB in all).
# Usage: scripts/gpu_bundle.sh [BUNDLE_DIR]   (default .gpu; needs nvcc on PATH, CUDA_COMPUTE_CAP)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gpu}
mkdir -p "$out/bin"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo build --release --features cuda --bins
cargo test --release --features cuda --no-run 2>&1 | tee "$log" >&2
cargo bench --features cuda --bench gpu --no-run 2>&1 | tee -a "$log" >&2
exe() { sed -n "s|.*Executable $1 (\(.*\))|\1|p" "$log" | tail -1; }
tests=$(exe 'tests/main.rs')
bench=$(exe 'tests/benches/gpu.rs')
[ -n "$tests" ] && [ -n "$bench" ] || { echo "gpu_bundle: test or bench binary not found" >&2; exit 1; }
pack() { strip -o "$out/bin/$2" "$1" && xz -T0 -6 -f "$out/bin/$2"; }
pack "$tests" main
pack "$bench" gpu
for b in tb-train tb-eval tb-chat tb-tok; do pack "target/release/$b" "$b"; done
# The binaries look for configs, test data and tb-train under the directory they were built in.
pwd > "$out/manifest_dir"
du -sh "$out"
