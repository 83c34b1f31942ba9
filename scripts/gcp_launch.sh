#!/usr/bin/env bash
# Trains a tinybit model on one NVIDIA L4 in Google Cloud: uploads the source, configs and data
# to a bucket, creates a g2-standard-8 VM from a Deep Learning VM image whose startup script
# (scripts/cloud/startup.sh) builds tb-train with CUDA, runs `tb-train --resume` under systemd, syncs
# the run directory back to the bucket and powers the VM off when training is done.
# scripts/gcp_launch.ps1 is the same script, line for line, for PowerShell.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/gcp_launch.sh --bucket gs://NAME [options]
       scripts/gcp_launch.sh --restart --bucket gs://NAME [--name NAME] [--zone ZONE] [--project ID]

Creates an L4 VM that trains a model and writes its run directory to gs://NAME/RUN/run/.

Options (--flag VALUE or --flag=VALUE):
  --project ID          Google Cloud project (default: gcloud's configured project)
  --zone ZONE           zone with L4 GPUs (default us-central1-a)
  --bucket gs://NAME    bucket for source, configs, data and checkpoints; created when missing
  --name NAME           VM name and run name (default tinybit-MODEL, e.g. tinybit-micro)
  --model-config FILE   model architecture (default configs/micro.toml)
  --train-config FILE   training settings (default configs/train-micro-l4.toml)
  --data DIR            directory with tokenizer.json, train.bin and val.bin (default data),
                        made by scripts/prepare_data.sh
  --set KEY=VALUE       passed on to tb-train as --set KEY=VALUE (repeatable)
  --spot                a Spot VM: much cheaper, but Google may stop it at any time; it keeps its
                        disk, and --restart (from cron) starts it again to resume
  --machine-type TYPE   default g2-standard-8 (8 vCPUs, 32 GB, one L4)
  --image-family NAME   Deep Learning VM image family with CUDA
                        (default common-cu128-ubuntu-2204-nvidia-570)
  --disk-size GB        boot disk size (default 100)
  --restart             start the stopped VM again unless its run is done, then exit (for cron)
  --dry-run             print the commands it would run, run nothing
  --help                print this help

Needs gcloud (logged in: gcloud auth login) and tar. Exit status: 0 done, 2 usage error,
66 a config or data file is missing, 69 gcloud not found; a failing gcloud passes its status on.
EOF
}

die() { # STATUS MESSAGE
  echo "gcp_launch.sh: error: $2" >&2
  exit "$1"
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY_RUN=0
RESTART=0
SPOT=0
PROJECT=""
ZONE=us-central1-a
BUCKET=""
NAME=""
MODEL_CONFIG=configs/micro.toml
TRAIN_CONFIG=configs/train-micro-l4.toml
DATA=data
MACHINE_TYPE=g2-standard-8
IMAGE_FAMILY=common-cu128-ubuntu-2204-nvidia-570
DISK_SIZE=100
SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --restart) RESTART=1 ;;
    --spot) SPOT=1 ;;
    --project|--zone|--bucket|--name|--model-config|--train-config|--data|--set|--machine-type|--image-family|--disk-size)
      [ $# -ge 2 ] || die 2 "$1 needs a value (see --help)"
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --bucket) BUCKET=$2 ;;
        --name) NAME=$2 ;;
        --model-config) MODEL_CONFIG=$2 ;;
        --train-config) TRAIN_CONFIG=$2 ;;
        --data) DATA=$2 ;;
        --set) SETS+=("$2") ;;
        --machine-type) MACHINE_TYPE=$2 ;;
        --image-family) IMAGE_FAMILY=$2 ;;
        --disk-size) DISK_SIZE=$2 ;;
      esac
      shift ;;
    *) die 2 "unknown argument $1 (see --help)" ;;
  esac
  shift
done
[ -n "$BUCKET" ] || die 2 "--bucket gs://NAME is required (see --help)"
BUCKET="gs://${BUCKET#gs://}"
BUCKET=${BUCKET%/}
if [ -z "$NAME" ]; then
  NAME="tinybit-$(basename "$MODEL_CONFIG" .toml)"
fi
case "$NAME" in
  [a-z]*) ;;
  *) die 2 "--name must start with a lower-case letter (a VM name), not '$NAME'" ;;
esac
PREFIX="$BUCKET/$NAME"
# gcloud's own flags: the project (when given) for every command, and the zone for the VM's.
PROJ=()
[ -z "$PROJECT" ] || PROJ=(--project="$PROJECT")
WHERE=(--zone="$ZONE" ${PROJ[@]+"${PROJ[@]}"})

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
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"
  else
    "$@"
  fi
}

if [ "$DRY_RUN" = 0 ] && ! command -v gcloud >/dev/null 2>&1; then
  die 69 "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) and run gcloud auth login"
fi

if [ "$RESTART" = 1 ]; then
  # After a Spot preemption the VM is stopped with its disk; starting it resumes training. A run
  # that finished (or failed for good) is marked in the bucket and not started again.
  for mark in DONE FAILED; do
    if [ "$DRY_RUN" = 0 ] && gcloud storage ls "$PREFIX/run/$mark" >/dev/null 2>&1; then
      echo "gcp_launch.sh: $PREFIX/run/$mark exists; not starting $NAME" >&2
      exit 0
    fi
  done
  run gcloud compute instances start "$NAME" "${WHERE[@]}"
  exit 0
fi

for f in "$MODEL_CONFIG" "$TRAIN_CONFIG" "$DATA/tokenizer.json" "$DATA/train.bin" "$DATA/val.bin"; do
  if [ ! -f "$f" ]; then
    [ "$DRY_RUN" = 1 ] || die 66 "$f does not exist (data comes from scripts/prepare_data.sh)"
    echo "gcp_launch.sh: warning: $f does not exist" >&2
  fi
done

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
# The tb-train --set overrides travel in the bucket, one per line.
: >"$STAGE/set.txt"
[ "${#SETS[@]}" -eq 0 ] || printf '%s\n' "${SETS[@]}" >"$STAGE/set.txt"
if [ "$DRY_RUN" = 1 ]; then
  echo "cat > $STAGE/set.txt <<'EOF'"
  cat "$STAGE/set.txt"
  echo "EOF"
fi

if [ "$DRY_RUN" = 1 ] || ! gcloud storage buckets describe "$BUCKET" >/dev/null 2>&1; then
  [ "$DRY_RUN" = 0 ] || echo "# when the bucket does not exist yet:"
  run gcloud storage buckets create "$BUCKET" --location="${ZONE%-*}" ${PROJ[@]+"${PROJ[@]}"}
fi
# The working tree as it is (uncommitted changes included), without build outputs and data.
run tar -czf "$STAGE/tinybit-src.tar.gz" -C "$ROOT" --exclude=./target --exclude=./data --exclude=./runs --exclude=./.git .
run gcloud storage cp "$STAGE/tinybit-src.tar.gz" "$PREFIX/src/tinybit-src.tar.gz"
run gcloud storage cp "$MODEL_CONFIG" "$PREFIX/config/model.toml"
run gcloud storage cp "$TRAIN_CONFIG" "$PREFIX/config/train.toml"
run gcloud storage cp "$STAGE/set.txt" "$PREFIX/config/set.txt"
run gcloud storage cp "$DATA/tokenizer.json" "$DATA/train.bin" "$DATA/val.bin" "$PREFIX/data/"

# shellcheck disable=SC2054 # the commas are gcloud's, inside single arguments
CREATE=(gcloud compute instances create "$NAME" "${WHERE[@]}"
  --machine-type="$MACHINE_TYPE"
  --accelerator=type=nvidia-l4,count=1
  --maintenance-policy=TERMINATE
  --image-family="$IMAGE_FAMILY"
  --image-project=deeplearning-platform-release
  --boot-disk-size="${DISK_SIZE}GB"
  --scopes=cloud-platform
  --metadata="install-nvidia-driver=True,tinybit-bucket=$BUCKET,tinybit-run=$NAME"
  --metadata-from-file="startup-script=$ROOT/scripts/cloud/startup.sh")
if [ "$SPOT" = 1 ]; then
  CREATE+=(--provisioning-model=SPOT --instance-termination-action=STOP)
fi
run "${CREATE[@]}"

[ "$DRY_RUN" = 1 ] && exit 0
cat >&2 <<EOF
gcp_launch.sh: $NAME is starting; the first boot builds tinybit (about 10 minutes).
  progress:    gcloud storage cat $PREFIX/run/train.jsonl | tail -n 3
  live log:    gcloud compute ssh $NAME ${WHERE[*]} -- journalctl -fu tinybit-train
  checkpoints: gcloud storage ls $PREFIX/run/
  after a Spot preemption, from cron:
    */15 * * * * $ROOT/scripts/gcp_launch.sh --restart --bucket $BUCKET --name $NAME ${WHERE[*]} >/dev/null 2>&1
  when done:   gcloud compute instances delete $NAME ${WHERE[*]}
EOF
