#!/usr/bin/env bash
# Files bigger than one call may carry (64 MiB with the working tree), taken to the GPU test machine
# over several back-to-back calls: `pack` here writes one tar (SHA256SUMS inside) split into parts of
# 60 MB, each in a folder of its own under .carry/ (ignored by git), so each call carries one folder;
# `stage` there keeps a carried part in /tmp/carry (it survives while the machine stays warm);
# `unpack` joins the parts, checks every file's sha256 and unpacks into a folder.
#   tools/gpu/carry.sh pack FILE...      # here: prints the .carry/NN folders, one per call
#   tools/gpu/carry.sh stage .carry/NN   # there, in each call
#   tools/gpu/carry.sh unpack DEST       # there, once every part is staged
set -euo pipefail
cd "$(dirname "$0")/../.."
PART_BYTES=60000000

case "${1:-}" in
pack)
  shift; [ $# -gt 0 ] || { echo "carry: name the files to pack" >&2; exit 2; }
  rm -rf .carry && mkdir -p .carry/tmp
  for f in "$@"; do [ -f "$f" ] || { echo "carry: $f is not a file" >&2; exit 2; }; cp -l "$f" .carry/tmp/ 2>/dev/null || cp "$f" .carry/tmp/; done
  (cd .carry/tmp && sha256sum -- * > SHA256SUMS)
  tar -C .carry/tmp -cf - . | split -b $PART_BYTES -d -a 2 - .carry/part-
  rm -rf .carry/tmp
  n=0; for p in .carry/part-*; do mkdir -p ".carry/$(printf %02d $n)"; mv "$p" ".carry/$(printf %02d $n)/"; n=$((n + 1)); done
  ls -d .carry/[0-9]* ;;
stage)
  d="${2:?the carried .carry/NN folder}"; mkdir -p /tmp/carry; cp "$d"/part-* /tmp/carry/ && ls /tmp/carry ;;
unpack)
  dest="${2:?destination folder}"; mkdir -p "$dest"
  cat /tmp/carry/part-* | tar -C "$dest" -xf - && (cd "$dest" && sha256sum -c --quiet SHA256SUMS) && ls -la "$dest" ;;
*)
  echo "usage: $0 pack FILE... | stage .carry/NN | unpack DEST" >&2; exit 2 ;;
esac
