#!/usr/bin/env bash
# The startup script of the VM that scripts/gcp_launch.sh creates; Google runs it as root at every
# boot, so each step is safe to repeat. It installs itself as /opt/tinybit/startup.sh, which the
# systemd units call with `train` and `sync`. There is no PowerShell twin: it runs only on the VM.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: startup.sh [--dry-run] [boot|train|sync]

  boot    (default; what Google runs at every boot) install Rust, fetch the source, configs and
          data from the bucket, build tb-train with CUDA, restore the run directory from the
          bucket, install the systemd units and start training, unless the run is marked DONE
          or FAILED
  train   (the tinybit-train service) run tb-train --resume; on success mark the run DONE, sync
          it and power off; on a permanent error (status 2, 65, 66, 69, 74) mark it FAILED, sync
          and power off; otherwise exit with tb-train's status so systemd restarts it in a minute
  sync    (the tinybit-sync timer, every 10 minutes) copy the run directory to the bucket

Options:
  --dry-run   print the commands it would run, run nothing
  --help      print this help

The bucket and run name come from the VM's metadata (tinybit-bucket, tinybit-run), or from the
environment variables TINYBIT_BUCKET and TINYBIT_RUN; TINYBIT_HOME is the working directory
(default /opt/tinybit).
EOF
}

die() { # STATUS MESSAGE
  echo "startup.sh: error: $2" >&2
  exit "$1"
}

DRY_RUN=0
MODE=boot
while [ $# -gt 0 ]; do
  case "$1" in
    --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    boot|train|sync) MODE=$1 ;;
    *) die 2 "unknown argument $1 (see --help)" ;;
  esac
  shift
done

# Prints words as a shell command line, quoting only the words that need it.
quote() {
  local w sq="'" esc="'\\''" out=()
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$w"); else out+=("'${w//$sq/$esc}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command; in a dry run, prints it instead.
run() {
  if [ "$DRY_RUN" = 1 ]; then quote "$@"; else "$@"; fi
}

# Writes stdin to FILE; in a dry run, prints the command that would.
write_file() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "cat > $1 <<'EOF'"
    cat
    echo "EOF"
  else
    cat >"$1"
  fi
}

meta() {
  curl -fsS -H 'Metadata-Flavor: Google' \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" 2>/dev/null || true
}

export HOME=${HOME:-/root}
BASE=${TINYBIT_HOME:-/opt/tinybit}
SELF="$BASE/startup.sh"
BUCKET=${TINYBIT_BUCKET:-$(meta tinybit-bucket)}
RUN=${TINYBIT_RUN:-$(meta tinybit-run)}
if [ -z "$BUCKET" ] || [ -z "$RUN" ]; then
  die 2 "no bucket or run name: set the VM metadata tinybit-bucket and tinybit-run (scripts/gcp_launch.sh does)"
fi
PREFIX="$BUCKET/$RUN"
CARGO="$HOME/.cargo/bin/cargo"

sync_up() {
  # Hidden files are checkpoints being written (renamed into place when complete); the lock is
  # only meaningful on this disk.
  run gcloud storage rsync --recursive --delete-unmatched-destination-objects \
    --exclude='(^|/)[.]|(^|/)lock$' "$BASE/run" "$PREFIX/run"
}

boot() {
  run mkdir -p "$BASE/src" "$BASE/config" "$BASE/data" "$BASE/run"
  [ "$0" -ef "$SELF" ] || run cp "$0" "$SELF"
  if ! command -v cc >/dev/null 2>&1; then
    run apt-get update
    run apt-get install -y build-essential pkg-config
  fi
  if [ ! -x "$CARGO" ]; then
    run sh -c "curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal"
  fi
  run gcloud storage cp "$PREFIX/src/tinybit-src.tar.gz" "$BASE/tinybit-src.tar.gz"
  run tar -xzf "$BASE/tinybit-src.tar.gz" -C "$BASE/src"
  run gcloud storage rsync --recursive "$PREFIX/config" "$BASE/config"
  run gcloud storage rsync --recursive "$PREFIX/data" "$BASE/data"
  # The L4 is compute capability 8.9; nvcc comes with the Deep Learning VM image.
  export PATH="/usr/local/cuda/bin:$PATH"
  run env CUDA_COMPUTE_CAP=89 "$CARGO" build --release --features cuda --bin tb-train --manifest-path "$BASE/src/Cargo.toml"
  # A new disk (or a VM recreated) continues from the bucket's checkpoints.
  run gcloud storage rsync --recursive "$PREFIX/run" "$BASE/run" ||
    echo "startup.sh: no run in $PREFIX/run yet; starting from step 0" >&2
  for mark in DONE FAILED; do
    if [ -e "$BASE/run/$mark" ]; then
      echo "startup.sh: $PREFIX/run is marked $mark; not training (delete $mark to train again)" >&2
      return 0
    fi
  done
  # The image installs the driver on first boot; wait until the GPU answers.
  if [ "$DRY_RUN" = 1 ]; then
    echo "nvidia-smi"
  else
    for _ in $(seq 60); do nvidia-smi >/dev/null 2>&1 && break; sleep 10; done
    nvidia-smi >/dev/null || die 69 "the NVIDIA driver does not answer (nvidia-smi failed)"
  fi
  write_file /etc/systemd/system/tinybit-train.service <<EOF
[Unit]
Description=tinybit training: tb-train --resume in $BASE/run
After=network-online.target
Wants=network-online.target

[Service]
Environment=HOME=$HOME
ExecStart=$SELF train
Restart=on-failure
RestartSec=60
# SIGTERM (preemption, shutdown): tb-train finishes its step, writes a checkpoint, exits 130.
TimeoutStopSec=90
EOF
  write_file /etc/systemd/system/tinybit-sync.service <<EOF
[Unit]
Description=copy the tinybit run directory to $PREFIX/run

[Service]
Type=oneshot
Environment=HOME=$HOME
ExecStart=$SELF sync
EOF
  write_file /etc/systemd/system/tinybit-sync.timer <<EOF
[Unit]
Description=copy the tinybit run directory to the bucket every 10 minutes

[Timer]
OnActiveSec=10min
OnUnitActiveSec=10min

[Install]
WantedBy=timers.target
EOF
  run systemctl daemon-reload
  run systemctl enable --now tinybit-sync.timer
  run systemctl restart tinybit-train.service
}

train() {
  run cd "$BASE"
  local args=(--model-config config/model.toml --train-config config/train.toml --out run --resume
    --set train.train_data=data/train.bin --set train.val_data=data/val.bin
    --set train.tokenizer=data/tokenizer.json)
  if [ -f "$BASE/config/set.txt" ]; then
    while IFS= read -r kv; do
      [ -z "$kv" ] || args+=(--set "$kv")
    done <"$BASE/config/set.txt"
  fi
  # With a trap, bash waits for tb-train to save its checkpoint before running the sync below.
  trap 'echo "startup.sh: stopping; tb-train saves a checkpoint first" >&2' TERM
  local rc=0
  run "$BASE/src/target/release/tb-train" "${args[@]}" || rc=$?
  case "$rc" in
    0)
      run touch "$BASE/run/DONE"
      sync_up
      run systemctl poweroff
      ;;
    2 | 65 | 66 | 69 | 74)
      echo "startup.sh: tb-train failed with status $rc (see journalctl -u tinybit-train); powering off" >&2
      run sh -c "echo $rc > $BASE/run/FAILED"
      sync_up
      run systemctl poweroff
      ;;
    *)
      sync_up || true
      exit "$rc"
      ;;
  esac
}

case "$MODE" in
  boot) boot ;;
  train) train ;;
  sync) sync_up ;;
esac
