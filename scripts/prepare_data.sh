#!/usr/bin/env bash
# Gathers a text corpus and turns it into the three files tb-train reads: OUT/tokenizer.json,
# OUT/train.bin and OUT/val.bin. Works offline from local text; URLs go through tb-fetch (the only
# tinybit command that touches the network). scripts/prepare_data.ps1 is the same script, line for
# line, for PowerShell.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: [VAR=value ...] scripts/prepare_data.sh [--dry-run] OUT_DIR [SOURCE...]

Gathers UTF-8 text from SOURCE files and directories (and from URLS) into OUT_DIR/corpus/, trains a
tokenizer on it, and encodes it into OUT_DIR/tokenizer.json, OUT_DIR/train.bin and OUT_DIR/val.bin.
Prints the three paths on stdout.

Options:
  --dry-run     print the commands it would run, run nothing
  --help        print this help

Environment:
  DATA_PROFILE     general (default) or coding: the local text used when no SOURCE or URL is named.
                   general: tests/data/tinyshakespeare.txt and the text files of /usr/share/doc;
                   coding: the Rust sources in the cargo registry ($CARGO_HOME/registry/src/*/*/src)
  SOURCES          more sources, separated by spaces (added after the SOURCE arguments)
  URLS             URLs fetched with tb-fetch (cached), separated by spaces
  TOTAL_TOKENS     cap on the corpus, approximately: TOTAL_TOKENS x BYTES_PER_TOKEN bytes are
                   gathered (default 100000000)
  BYTES_PER_TOKEN  bytes per token assumed by the cap (default 4, about right for English and code)
  TOKENIZER        use this tokenizer file instead of training one, e.g. "$(tb-fetch)"
  VOCAB_SIZE       size of the trained tokenizer, special tokens included (default 50304)
  VAL_FRACTION     fraction of the text that goes to val.bin (default 0.05)
  TB_BIN           directory holding tb-tok and tb-fetch (default target/release, else PATH)

Files that are not UTF-8 text (binary, NUL bytes, other encodings) and hidden files are skipped.
Files are taken in sorted order; the file that crosses the cap is cut after its last whole line.
Exit status: 0 done, 2 usage error, 65 no usable text, 66 a SOURCE does not exist, 69 tb-tok or
tb-fetch not found; a failing tb-tok or tb-fetch passes its own status on.
EOF
}

die() { # STATUS MESSAGE
  echo "prepare_data.sh: error: $2" >&2
  exit "$1"
}

DRY_RUN=0
OUT=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    -*) die 2 "unknown option $1 (see --help)" ;;
    *) if [ -z "$OUT" ]; then OUT=$1; else ARGS+=("$1"); fi ;;
  esac
  shift
done
[ -n "$OUT" ] || die 2 "no output directory given (see --help)"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA_PROFILE=${DATA_PROFILE:-general}
TOTAL_TOKENS=${TOTAL_TOKENS:-100000000}
BYTES_PER_TOKEN=${BYTES_PER_TOKEN:-4}
VOCAB_SIZE=${VOCAB_SIZE:-50304}
VAL_FRACTION=${VAL_FRACTION:-0.05}
case "$DATA_PROFILE" in
  general|coding) ;;
  *) die 2 "DATA_PROFILE must be general or coding, not '$DATA_PROFILE'" ;;
esac
for v in TOTAL_TOKENS BYTES_PER_TOKEN VOCAB_SIZE; do
  case "${!v}" in
    ''|*[!0-9]*|0) die 2 "$v must be a positive whole number, not '${!v}'" ;;
  esac
done
BUDGET=$((TOTAL_TOKENS * BYTES_PER_TOKEN))
CORPUS="$OUT/corpus"

# The tinybit binary NAME: $TB_BIN/NAME, else target/release/NAME, else NAME on PATH.
find_bin() {
  if [ -n "${TB_BIN:-}" ]; then
    [ -x "$TB_BIN/$1" ] && { echo "$TB_BIN/$1"; return 0; }
    echo "prepare_data.sh: TB_BIN=$TB_BIN holds no $1" >&2
  elif [ -x "$ROOT/target/release/$1" ]; then
    echo "$ROOT/target/release/$1"; return 0
  elif command -v "$1" >/dev/null 2>&1; then
    command -v "$1"; return 0
  fi
  if [ "$DRY_RUN" = 1 ]; then echo "$1"; return 0; fi
  return 1
}
NOBIN="build it with 'cargo build --release' or set TB_BIN to the directory that holds it"

# Prints words as a shell command line, quoting only the words that need it.
quote() {
  local w sq="'" esc="'\\''" out=()
  for w in "$@"; do
    if [[ $w =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$w"); else out+=("'${w//$sq/$esc}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command with its stdout sent to stderr (stdout carries only the final paths); in a dry run,
# prints it instead.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"
  else
    "$@" >&2
  fi
}

USED=0
FULL=0
COUNT=0
SKIPPED=0

# UTF-8 text: no NUL byte, and valid UTF-8.
is_text() {
  LC_ALL=C grep -qI '' "$1" 2>/dev/null && iconv -f UTF-8 -t UTF-8 "$1" >/dev/null 2>&1
}

# Copies one file into the corpus. The file that crosses the budget keeps only the whole lines of
# its first bytes (sed drops the last, maybe cut, line), and fills the corpus.
add_file() {
  [ "$FULL" = 0 ] || return 0
  if ! is_text "$1"; then SKIPPED=$((SKIPPED + 1)); return 0; fi
  local size left dst
  size=$(($(wc -c <"$1")))
  left=$((BUDGET - USED))
  COUNT=$((COUNT + 1))
  dst="$CORPUS/$(printf '%06d' "$COUNT")-$(basename "$1")"
  if [ "$size" -le "$left" ]; then
    run cp "$1" "$dst"
    USED=$((USED + size))
    [ "$USED" -lt "$BUDGET" ] || FULL=1
  elif [ "$DRY_RUN" = 1 ]; then
    echo "head -c $left $(quote "$1") | LC_ALL=C sed '\$d' > $(quote "$dst")"
    USED=$((USED + left))
    FULL=1
  else
    head -c "$left" "$1" | LC_ALL=C sed '$d' >"$dst"
    USED=$((USED + $(wc -c <"$dst")))
    FULL=1
  fi
}

# Adds a file, or the files under a directory in sorted order (hidden ones skipped) whose names
# match PATTERN (default: all).
add_source() {
  [ -e "$1" ] || die 66 "source $1 does not exist"
  [ "$FULL" = 0 ] || return 0
  if [ -f "$1" ]; then add_file "$1"; return 0; fi
  local f
  while IFS= read -r -d '' f; do
    add_file "$f"
    [ "$FULL" = 0 ] || break
  done < <(find "$1" -mindepth 1 -name '.*' -prune -o -type f -name "${2:-*}" -print0 | LC_ALL=C sort -z)
}

TB_TOK=$(find_bin tb-tok) || die 69 "tb-tok not found: $NOBIN"
read -r -a EXTRA <<<"${SOURCES:-}"
read -r -a URL_LIST <<<"${URLS:-}"
if [ "${#URL_LIST[@]}" -gt 0 ]; then
  TB_FETCH=$(find_bin tb-fetch) || die 69 "tb-fetch not found: $NOBIN"
fi

[ -n "${TOKENIZER:-}" ] && [ ! -f "$TOKENIZER" ] && die 66 "TOKENIZER=$TOKENIZER does not exist"
echo "prepare_data.sh: gathering up to $BUDGET bytes (~$TOTAL_TOKENS tokens) into $CORPUS" >&2
# The corpus directory is ours to replace only when our marker file says we made it.
if [ -e "$CORPUS" ] && [ ! -e "$CORPUS/.prepare_data" ]; then
  die 2 "$CORPUS exists and was not made by prepare_data.sh; move it away or choose another OUT_DIR"
fi
run rm -rf "$CORPUS"
run mkdir -p "$CORPUS"
run touch "$CORPUS/.prepare_data"
# ${A[@]+"${A[@]}"}: an empty array under set -u in bash 3.2 (macOS).
for s in ${ARGS[@]+"${ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}; do
  add_source "$s"
done
for u in ${URL_LIST[@]+"${URL_LIST[@]}"}; do
  if [ "$DRY_RUN" = 1 ]; then
    run "$TB_FETCH" -q "$u"
    echo "# then gather the file whose path tb-fetch prints"
  else
    fetched=$("$TB_FETCH" -q "$u")
    add_source "$fetched"
  fi
done
if [ "${#ARGS[@]}" -eq 0 ] && [ "${#EXTRA[@]}" -eq 0 ] && [ "${#URL_LIST[@]}" -eq 0 ]; then
  if [ "$DATA_PROFILE" = general ]; then
    add_source "$ROOT/tests/data/tinyshakespeare.txt"
    [ -d /usr/share/doc ] && add_source /usr/share/doc
  else
    shopt -s nullglob
    for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/*/src; do
      add_source "$d" '*.rs'
    done
    shopt -u nullglob
  fi
fi
if [ "$COUNT" -eq 0 ] && [ "$DRY_RUN" = 0 ]; then
  die 65 "no UTF-8 text found in the sources; name some with SOURCES or arguments"
fi
echo "prepare_data.sh: $COUNT files, $USED bytes gathered ($SKIPPED files skipped: not UTF-8 text)" >&2

if [ -n "${TOKENIZER:-}" ]; then
  [ "$TOKENIZER" -ef "$OUT/tokenizer.json" ] || run cp "$TOKENIZER" "$OUT/tokenizer.json"
else
  run "$TB_TOK" train --vocab-size "$VOCAB_SIZE" -o "$OUT/tokenizer.json" "$CORPUS"
fi
run "$TB_TOK" encode --tokenizer "$OUT/tokenizer.json" -o "$OUT/train.bin" \
  --val-output "$OUT/val.bin" --val-fraction "$VAL_FRACTION" "$CORPUS"
run "$TB_TOK" count "$OUT/train.bin"
run "$TB_TOK" count "$OUT/val.bin"
if [ "$DRY_RUN" = 0 ]; then
  printf '%s\n' "$OUT/tokenizer.json" "$OUT/train.bin" "$OUT/val.bin"
fi
