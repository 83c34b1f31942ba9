#!/usr/bin/env bash
# Lays out a CUDA 13.0 toolkit from NVIDIA's PyPI wheels, enough to build (or type-check) the cuda
# feature on a machine without a GPU or a distribution package of the toolkit. Linux only, so it
# has no PowerShell twin.
set -euo pipefail

usage() {
  cat <<'EOF2'
Usage: scripts/setup_cuda.sh [--dry-run] ROOT

Installs the CUDA 13.0 toolkit pieces tinybit's cuda feature needs at build time (nvcc, nvvm, the
runtime, cccl headers, cuBLAS, cuRAND, NVRTC; about 700 MB of wheels, every one pinned) from PyPI
into ROOT/cuda13 with pip, lays out ROOT/cudahome as a CUDA_HOME, links against a stub libcuda.so
(the driver's library is in no wheel; the real one is used at run time), and writes ROOT/env.sh.
Then: . ROOT/env.sh && cargo build --release --features cuda
Re-running with the same ROOT reuses what is there. Needs python3 with pip, gcc and cargo.

Options:
  --dry-run     print what it would install, install nothing
  --help        print this help

Environment:
  CUDA_COMPUTE_CAP  written to env.sh (default 90: H100/H200; 89 for an L4, 80 for an A100)
EOF2
}

dry=0
root=
for a in "$@"; do
  case $a in
    --help) usage; exit 0 ;;
    --dry-run) dry=1 ;;
    -*) echo "setup_cuda: unknown option $a (see --help)" >&2; exit 2 ;;
    *) root=$a ;;
  esac
done
[ -n "$root" ] || { usage >&2; exit 2; }
# nvidia-cuda-nvcc depends on nvvm/runtime/crt unpinned, which would pull a newer CUDA: pin all.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
if [ "$dry" = 1 ]; then
  echo "pip install --target $root/cuda13 ${wheels[*]}"
  exit 0
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
root=$(realpath -m "$root")
mkdir -p "$root"
c=$root/cuda13/nvidia/cu13
if [ ! -x "$c/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$root/cuda13" "${wheels[@]}"
fi
h=$root/cudahome
mkdir -p "$h/lib64/stubs"
ln -sfn "$c/bin" "$h/bin"
ln -sfn "$c/include" "$h/include"
ln -sfn "$c/nvvm" "$h/nvvm"
ln -sfn lib64 "$h/lib"
for f in "$c"/lib/*; do ln -sfn "$f" "$h/lib64/$(basename "$f")"; done
for s in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  ln -sfn "$s" "$h/lib64/${s%.so.*}.so"
done
# A stub libcuda.so exporting every driver entry point cudarc can call, for the linker only (a
# type-check does not link: without cudarc's source at hand, go on without the stub).
if [ ! -e "$h/lib64/stubs/libcuda.so" ]; then
  cudarc=$(cargo metadata --manifest-path "$repo/Cargo.toml" --format-version 1 --features cuda 2>/dev/null |
    python3 -c 'import json,sys; print([p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"][0])') ||
    cudarc=
  sys_rs=$(dirname "${cudarc:-/nonexistent/x}")/src/driver/sys/mod.rs
  if [ -f "$sys_rs" ]; then
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$sys_rs" |
      awk '{print $4}' | sort -u | sed 's/.*/void &(void) {}/' > "$h/lib64/stubs/libcuda_stub.c"
    gcc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o "$h/lib64/stubs/libcuda.so" "$h/lib64/stubs/libcuda_stub.c"
  else
    echo "setup_cuda: cudarc's source not found; no libcuda stub (cargo check works, linking does not)" >&2
  fi
fi
cat > "$root/env.sh" <<EOF2
# . this file before cargo build --features cuda
export CUDA_HOME=$h
export CUDA_PATH=\$CUDA_HOME CUDA_ROOT=\$CUDA_HOME
export PATH=\$CUDA_HOME/bin:\$PATH
export LIBRARY_PATH=\$CUDA_HOME/lib64:\$CUDA_HOME/lib64/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export LD_LIBRARY_PATH=\$CUDA_HOME/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
EOF2
"$h/bin/nvcc" --version | tail -1
echo "$root/env.sh"
