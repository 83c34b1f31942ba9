#!/usr/bin/env bash
# Every GPU check of tinybit in one run, on a CUDA machine without a Rust toolchain (the usual
# rented GPU box). Linux only, so it has no PowerShell twin.
set -uo pipefail

usage() {
  cat <<'EOF2'
Usage: [VAR=value ...] scripts/gpu_check.sh [--dry-run] BUNDLE [OUT]

Runs, from a tinybit checkout on a machine with an NVIDIA GPU and its driver (no Rust needed),
the binaries that scripts/gpu_bundle.sh packed into BUNDLE: the GPU tests (the WKV kernel against
the CPU operator and the composed scan, the golden case, a training step against the CPU's,
checkpoints resumed across devices), the GPU benchmark (training steps per batch size and matrix
precision with peak GPU memory, the WKV kernel alone), and a short run of
configs/train-micro-l4.toml whose checkpoint then chats on the CPU and is evaluated on the GPU.
Prints one JSON line per result on stdout; logs go to OUT (default gpu-check).

Options:
  --dry-run     print what it would run, run nothing
  --help        print this help

Environment:
  BATCHES       batch sizes of the training benchmark (default "4 16 32 64")
  VARIANTS      kernels:precision of each benchmark run (default "fused:tf32 default:tf32 default:f32")
  L4_SECONDS    length of the L4-config run (default 90)
  PART_SECONDS  time limit of each test or benchmark process (default 300)
  CUDA_HOME     the CUDA toolkit, for its libraries (default /usr/local/cuda)
EOF2
}

dry=0
args=()
for a in "$@"; do
  case $a in
    --help) usage; exit 0 ;;
    --dry-run) dry=1 ;;
    -*) echo "gpu_check: unknown option $a (see --help)" >&2; exit 2 ;;
    *) args+=("$a") ;;
  esac
done
[ "${#args[@]}" -ge 1 ] || { usage >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 1
if [ "$dry" = 1 ]; then
  echo "main --test-threads 1 --show-output gpu composed"
  for batch in ${BATCHES:-4 16 32 64}; do
    for variant in ${VARIANTS:-fused:tf32 default:tf32 default:f32}; do
      echo "TB_BENCH_BATCHES=$batch TB_BENCH_VARIANTS=$variant gpu"
    done
  done
  echo "TB_BENCH_TRAIN=0 gpu"
  echo "tb-tok encode; tb-train configs/micro.toml configs/train-micro-l4.toml --max-time ${L4_SECONDS:-90}; tb-chat --device cpu; tb-eval --device cuda"
  exit 0
fi
bundle=$(realpath "${args[0]}")
out=$(realpath -m "${args[1]:-gpu-check}")
mkdir -p "$out/bin"
export LD_LIBRARY_PATH="${CUDA_HOME:-/usr/local/cuda}/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for f in "$bundle"/bin/*; do
  name=$(basename "$f" .xz)
  if [ "${f%.xz}" != "$f" ]; then xz -dc "$f" > "$out/bin/$name"; else cp "$f" "$out/bin/$name"; fi
  chmod +x "$out/bin/$name"
done
b=$out/bin
# The test binaries find configs, data and tb-train under the directory they were built in.
built=$(cat "$bundle/manifest_dir")
if [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -s "$PWD" "$built"; fi
ln -sf "$b/tb-train" "$b/tb-eval" "$b/tb-chat" "$b/tb-tok" "$built/target/release/" 2>/dev/null ||
  { mkdir -p "$built/target/release" && ln -sf "$b"/tb-* "$built/target/release/"; }
json() { printf '%s\n' "$1"; }
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
json "{\"check\": \"gpu\", \"gpu\": \"$gpu\"}"

# 1. Tests (everything whose name has "gpu" or "composed"), one line per test.
RUST_MIN_STACK=67108864 timeout "${PART_SECONDS:-300}" "$b/main" --test-threads 1 --show-output gpu composed > "$out/tests.log" 2>&1
sed -n 's/^test \([^ ]*\) \.\.\. \([a-zA-Z]*\)$/{"check": "test", "name": "\1", "result": "\2"}/p' "$out/tests.log"
grep -E 'relative error|max abs diff|skipped' "$out/tests.log" | sed 's/"/\\"/g; s/.*/{"check": "detail", "line": "&"}/'

# 2. Benchmark: each batch and variant in its own process, with the GPU's memory in use sampled
#    every 50 ms (the peak includes the CUDA context, ~0.5 GiB).
for batch in ${BATCHES:-4 16 32 64}; do
  for variant in ${VARIANTS:-fused:tf32 default:tf32 default:f32}; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$out/mem.log" 2>/dev/null &
    smi=$!
    TB_BENCH_WKV=0 TB_BENCH_BATCHES=$batch TB_BENCH_VARIANTS=$variant \
      timeout "${PART_SECONDS:-300}" "$b/gpu" 2>>"$out/bench.log"
    kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
    peak=$(sort -n "$out/mem.log" | tail -1)
    json "{\"bench\": \"gpu_memory\", \"batch\": $batch, \"variant\": \"$variant\", \"peak_mib\": ${peak:-null}}"
  done
done
TB_BENCH_TRAIN=0 timeout "${PART_SECONDS:-300}" "$b/gpu" 2>>"$out/bench.log"

# 3. The L4 config for L4_SECONDS on the GPU (NeoX tokenizer, Shakespeare), then chat on the CPU.
data=$out/l4-data
mkdir -p "$data"
"$b/tb-tok" encode --tokenizer tests/data/20B_tokenizer.json -o "$data/train.bin" \
  --val-output "$data/val.bin" tests/data/tinyshakespeare.txt 2>>"$out/l4.log"
rm -rf "$out/l4-run"
"$b/tb-train" -q --model-config configs/micro.toml --train-config configs/train-micro-l4.toml \
  --set train_data="$data/train.bin" --set val_data="$data/val.bin" \
  --set tokenizer=tests/data/20B_tokenizer.json --set eval_every=50 --set eval_batches=4 \
  --max-time "${L4_SECONDS:-90}" --out "$out/l4-run" > "$out/l4-train.jsonl" 2>>"$out/l4.log"
status=$?
steps=$(grep -c '"type":"step"' "$out/l4-train.jsonl")
first=$(grep '"type":"step"' "$out/l4-train.jsonl" | head -1 | sed 's/.*"loss":\([^,]*\).*/\1/')
last=$(grep '"type":"step"' "$out/l4-train.jsonl" | tail -1 | sed 's/.*"loss":\([^,]*\).*/\1/')
rate=$(grep '"type":"step"' "$out/l4-train.jsonl" | tail -n +3 | sed 's/.*"tok_per_s":\([^,]*\).*/\1/' | sort -g | awk '{a[NR]=$1} END {print (NR ? a[int((NR+1)/2)] : "null")}')
json "{\"check\": \"l4_run\", \"exit\": $status, \"steps\": $steps, \"first_loss\": ${first:-null}, \"last_loss\": ${last:-null}, \"median_tok_per_s\": $rate}"
grep '"type":"eval"' "$out/l4-train.jsonl" | tail -1
ck=$(find "$out/l4-run" -name 'step_*.safetensors' 2>/dev/null | sort | tail -1)
if [ -n "$ck" ]; then
  reply=$("$b/tb-chat" --device cpu -m "$ck" --raw -p "ROMEO:" -n 24 --temp 0 2>>"$out/l4.log")
  json "{\"check\": \"l4_chat_cpu\", \"exit\": $?, \"chars\": ${#reply}}"
  "$b/tb-eval" --device cuda -m "$ck" --json -q "$data/val.bin" 2>>"$out/l4.log" | tail -1
fi
