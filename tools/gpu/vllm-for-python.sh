#!/usr/bin/env bash
# Our vLLM wheel, built with one Python, made installable on another for the GPU test machine only.
# vLLM's libraries are limited-API (abi3) except DeepGEMM's `_C.cpython-3XY-*.so`, which vLLM's own
# tools/build_deepgemm_C.py builds for a target Python (its third argument). So: build that one
# library for the other Python with that same script (run it by hand, see docs/reports/), put it in
# place of the old one, and retag the wheel (the `wheel` tool rewrites RECORD and the tags).
# Every other file stays byte for byte as built.
#   tools/gpu/vllm-for-python.sh WHEEL NEW_DEEPGEMM_SO PYTAG OUTDIR     # PYTAG e.g. cp312
set -euo pipefail
whl=$(realpath "${1:?wheel}"); so=$(realpath "${2:?DeepGEMM _C .so for the other Python}")
tag=${3:?python tag, e.g. cp312}; out=$(realpath -m "${4:?output folder}")
py=${PYTHON:-python3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$py" -m wheel unpack -d "$work" "$whl" >/dev/null
root=$(ls -d "$work"/*/)
old=$(ls "$root"vllm/third_party/deep_gemm/_C.cpython-*.so)
rm "$old"; cp "$so" "$root"vllm/third_party/deep_gemm/
mkdir -p "$work/packed" "$out"
"$py" -m wheel pack -d "$work/packed" "$root" >/dev/null
"$py" -m wheel tags --python-tag "$tag" --abi-tag "$tag" --remove "$work"/packed/*.whl >/dev/null
mv "$work"/packed/*.whl "$out"/
ls "$out"/*"$tag"*.whl
