#!/usr/bin/env bash
# Builds tinybit's GPU test and benchmark binaries here and packs them for scripts/gpu_check.sh.
# Linux only (it builds the cuda feature), so it has no PowerShell twin.
set -euo pipefail

usage() {
  cat <<'EOF2'
Usage: scripts/gpu_bundle.sh [--dry-run] [BUNDLE_DIR]

Builds the cuda feature's test binary, GPU benchmark and tb-train, tb-eval, tb-chat, tb-tok on
this machine (Rust and the CUDA toolkit needed, no GPU), and packs them stripped and
xz-compressed (~45 MB) into BUNDLE_DIR (default .gpu) for scripts/gpu_check.sh on a CUDA machine
that has no Rust toolchain. Needs nvcc on PATH and CUDA_COMPUTE_CAP set (see the README, "GPU").

Options:
  --dry-run     print the commands it would run, run nothing
  --help        print this help
EOF2
}

dry=0
out=.gpu
for a in "$@"; do
  case $a in
    --help) usage; exit 0 ;;
    --dry-run) dry=1 ;;
    -*) echo "gpu_bundle: unknown option $a (see --help)" >&2; exit 2 ;;
    *) out=$a ;;
  esac
done
cd "$(dirname "$0")/.."
if [ "$dry" = 1 ]; then
  echo "cargo build --release --features cuda --bins"
  echo "cargo test --release --features cuda --no-run"
  echo "cargo bench --features cuda --bench gpu --no-run"
  echo "strip + xz -> $out/bin/{main,gpu,tb-train,tb-eval,tb-chat,tb-tok}.xz"
  exit 0
fi
mkdir -p "$out/bin"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo build --release --features cuda --bins
cargo test --release --features cuda --no-run 2>&1 | tee "$log" >&2
cargo bench --features cuda --bench gpu --no-run 2>&1 | tee -a "$log" >&2
exe() { sed -n "s|.*Executable $1 (\(.*\))|\1|p" "$log" | tail -1; }
tests=$(exe 'tests/main.rs')
bench=$(exe 'tests/benches/gpu.rs')
if [ -z "$tests" ] || [ -z "$bench" ]; then
  echo "gpu_bundle: test or bench binary not found in cargo's output" >&2
  exit 1
fi
pack() { strip -o "$out/bin/$2" "$1" && xz -T0 -6 -f "$out/bin/$2"; }
pack "$tests" main
pack "$bench" gpu
for b in tb-train tb-eval tb-chat tb-tok; do pack "target/release/$b" "$b"; done
# The binaries look for configs, test data and tb-train under the directory they were built in.
pwd > "$out/manifest_dir"
du -sh "$out"
