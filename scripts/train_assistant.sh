#!/usr/bin/env bash
# Trains the bundled tool-using assistant from nothing, on the CPU: synthetic tool conversations
# (tb-tok toolchat), a tokenizer, English pre-training on tests/data, fine-tuning on the
# conversations with the loss on the assistant's tokens only, the held-out evaluation, and the
# f16 model file. scripts/train_assistant.ps1 is the same script for PowerShell.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: [VAR=value ...] scripts/train_assistant.sh [--dry-run] [OUT_DIR]

Builds the bundled assistant in OUT_DIR (default runs/assistant): OUT_DIR/data/ (conversations,
held-out cases), OUT_DIR/tokenizer.json, OUT_DIR/pretrain/ and OUT_DIR/sft/ (tb-train runs),
OUT_DIR/eval.json (tb-eval --task tools on the held-out cases) and OUT_DIR/assistant.safetensors
(f16). Prints that last path on stdout. Copy it to src/lib/assets/assistant.safetensors and rebuild
to make it the default model of tb-chat and tb-eval.

Options:
  --dry-run     print the commands it would run, run nothing
  --help        print this help

Environment:
  SEED            generator and training seed (default 1)
  CONVERSATIONS   training conversations (default 30000)
  HELDOUT         held-out conversations (default 500)
  PRETRAIN_STEPS  English pre-training steps (default 1200)
  SFT_STEPS       fine-tuning steps (default 2000; 1500 with INIT_FROM, where it must be a
                  multiple of 250 and at least 750)
  INIT_FROM       a model to refine instead of training from nothing: no tokenizer training and
                  no pre-training; fine-tuning starts from its weights and tokenizer, with
                  configs/train-assistant-refine.toml, and the model written is the mean of
                  INIT_FROM and the run's last three checkpoints (tb-convert --average; this is
                  how the bundled model was made)
  THREADS         CPU threads (default: all cores)
  DEVICE          cpu (default) or cuda: where tb-train runs
  TB_BIN          directory holding the tb-* commands (default target/release, else PATH)

Runs from the repository root (it reads configs/ and tests/data/). About 2 hours on 2 CPU cores.
Exit status: 0 done, 2 usage error; a failing tb-* command passes its own status on.
EOF
}

dry=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --help|-h) usage; exit 0 ;;
    -*) echo "train_assistant.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -n "$out" ]; then echo "train_assistant.sh: one OUT_DIR only" >&2; exit 2; fi; out="$1" ;;
  esac
  shift
done
out="${out:-runs/assistant}"
# tb-train reads data paths relative to its config file: hand it absolute ones.
case "$out" in /*) abs="$out" ;; *) abs="$PWD/$out" ;; esac
seed="${SEED:-1}"
bin="${TB_BIN:-target/release}"
tb() { if [ -x "$bin/$1" ]; then echo "$bin/$1"; else echo "$1"; fi; }
threads=()
if [ -n "${THREADS:-}" ]; then threads=(-t "$THREADS"); fi

run() {
  # Each step's stdout goes to stderr: stdout carries only the final path.
  if [ "$dry" = 1 ]; then echo "$*"; else "$@" >&2; fi
}

pre_steps="${PRETRAIN_STEPS:-1200}"
average=()
init_from="${INIT_FROM:-}"
if [ -n "$init_from" ]; then sft_steps="${SFT_STEPS:-1500}"; else sft_steps="${SFT_STEPS:-2000}"; fi
case "$sft_steps" in ''|*[!0-9]*) echo "train_assistant.sh: SFT_STEPS must be a number" >&2; exit 2 ;; esac
if [ -n "$init_from" ] && { [ $((sft_steps % 250)) != 0 ] || [ "$sft_steps" -lt 750 ]; }; then
  # The last three checkpoints (one every 250 steps) are averaged.
  echo "train_assistant.sh: with INIT_FROM, SFT_STEPS must be a multiple of 250, at least 750" >&2
  exit 2
fi
sft_ck() { echo "$out/sft/step_$(printf '%07d' "$1").safetensors"; }
english=(tests/data/tinyshakespeare.txt tests/data/grimm.txt tests/data/wikitext2-valid.txt)
device="${DEVICE:-cpu}"

toolchat() {
  # With a tokenizer, some training fillers are built from its word pieces, so that fine-tuning
  # copies nearly every token the model can write (the held-out side does not change).
  run "$(tb tb-tok)" toolchat -o "$out/data" --seed "$seed" --train "${CONVERSATIONS:-30000}" \
    --heldout "${HELDOUT:-500}" --model-config configs/assistant.toml "$@"
}
if [ -z "$init_from" ]; then
  toolchat
  run "$(tb tb-tok)" train --vocab-size 4096 -o "$out/tokenizer.json" "${english[@]}" "$out/data/train.txt"
  toolchat --tokenizer "$out/tokenizer.json"
  run "$(tb tb-tok)" encode --tokenizer "$out/tokenizer.json" -o "$out/english.bin" \
    --val-output "$out/english-val.bin" --val-fraction 0.02 "${english[@]}"
  run "$(tb tb-train)" --model-config configs/assistant.toml \
    --train-config configs/train-assistant-pretrain.toml --out "$out/pretrain" "${threads[@]}" \
    --device "$device" --set "train_data=$abs/english.bin" --set "val_data=$abs/english-val.bin" \
    --set "tokenizer=$abs/tokenizer.json" --set "seed=$seed" \
    --set "max_steps=$pre_steps"
  sft_config=configs/train-assistant-sft.toml
  init_from="$out/pretrain/step_$(printf '%07d' "$pre_steps").safetensors"
  tok=(--set "tokenizer=$abs/tokenizer.json")
else
  toolchat -m "$init_from"
  # The model's own tokenizer is the run's (tb-train --init-from takes it from the file).
  sft_config=configs/train-assistant-refine.toml
  tok=()
  # The mean of the start and the run's last three checkpoints does better on the held-out
  # conversations than the last checkpoint alone (#13's note has the numbers).
  average=(--average "$init_from" --average "$(sft_ck $((sft_steps - 250)))" \
    --average "$(sft_ck $((sft_steps - 500)))")
fi
run "$(tb tb-train)" --train-config "$sft_config" --out "$out/sft" "${threads[@]}" \
  --device "$device" --init-from "$init_from" \
  --set "train_data=$abs/data/train.jsonl" --set "val_data=$abs/data/heldout.jsonl" \
  "${tok[@]}" --set "seed=$seed" --set "max_steps=$sft_steps"
run "$(tb tb-convert)" -i "$(sft_ck "$sft_steps")" "${average[@]}" -o "$out/assistant.safetensors" \
  --dtype f16
run "$(tb tb-eval)" -m "$out/assistant.safetensors" --task tools "${threads[@]}" \
  -o "$out/eval.json" "$out/data/cases.jsonl"
if [ "$dry" = 0 ]; then echo "$out/assistant.safetensors"; fi
