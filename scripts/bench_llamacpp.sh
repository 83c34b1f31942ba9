#!/usr/bin/env bash
# Runs the prebuilt llama.cpp anchor (llama-bench on an RWKV-7 GGUF of the same shape, random
# weights) so `cargo bench --bench decode` can print its figures beside the engine's, in one sitting.
# The anchor is copied to $TMPDIR first: a copy that lost its symbolic links (each one a small
# text file naming its target) gets them back there, so the shared libraries load.
set -euo pipefail
usage() {
  cat <<'EOF'
Usage: scripts/bench_llamacpp.sh [--dry-run] ANCHOR_DIR [-- SHAPE FLAGS]

Runs llama.cpp's llama-bench from ANCHOR_DIR (bench.sh, make_rwkv7_gguf.py, bin/) on an RWKV-7
model of the given shape (default: micro with vocab 16384). THREADS, REPS and TYPES pass through
to ANCHOR_DIR/bench.sh. Linux x86_64 only (the anchor is a prebuilt Linux binary).

  --dry-run   print what would run, run nothing
  --help      this text
EOF
}
dry=0
anchor=
while [ $# -gt 0 ]; do
  case $1 in
    --help|-h) usage; exit 0 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -*) echo "bench_llamacpp.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$anchor" ] || { echo "bench_llamacpp.sh: one ANCHOR_DIR only" >&2; exit 2; }
       anchor=$1; shift ;;
  esac
done
[ -n "$anchor" ] || { usage >&2; exit 2; }
[ -f "$anchor/bench.sh" ] || { echo "bench_llamacpp.sh: no bench.sh in $anchor" >&2; exit 66; }
work="${TMPDIR:-/tmp}/tinybit-llamacpp-bin"
if [ "$dry" = 1 ]; then
  echo "cp -R $anchor/. $work/ (symbolic links restored)"
  echo "bash $work/bench.sh $*"
  exit 0
fi
rm -rf "$work"
mkdir -p "$work"
cp -R "$anchor/." "$work/"
chmod -R u+w "$work"
for f in "$work"/bin/*; do
  [ -L "$f" ] && continue
  if [ "$(wc -c <"$f")" -lt 256 ] && ! head -c 4 "$f" | grep -q ELF; then
    target=$(cat "$f")
    rm "$f"
    ln -s "$target" "$f"
  fi
done
exec bash "$work/bench.sh" "$@"
