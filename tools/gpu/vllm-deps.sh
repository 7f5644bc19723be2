#!/usr/bin/env bash
# vLLM 0.25.1's runtime wheels for the GPU test machine, which has no network: what `import vllm`,
# LLM(...).generate (V1 engine, its engine core in a subprocess), the FlashInfer backend's imports and
# vLLM's tests/kernels need beyond the machine's image (torch 2.11.0+cu130, transformers, triton, ...).
# Not here: vllm, flashinfer-python/-cubin, apache-tvm-ffi (carried separately). Which requirement
# each wheel serves is in the report that came with the set; in short: pydantic (+core, annotated-types,
# typing-inspection, typing-extensions), msgspec, pyzmq, cbor2, cachetools, pybase64, fastapi,
# starlette, openai (+distro, sniffio, jiter), openai-harmony, partial-json-parser, llguidance,
# xgrammar, compressed-tensors (+loguru), setuptools<81 and cuda-tile (FlashInfer's flashinfer.comm)
# for vllm; tblib, anthropic (+docstring-parser), uvicorn, watchfiles,
# model-hosting-container-standards (+jmespath, supervisor) for the tests' conftest.py and utils.py.
# A call carries at most 64 MiB, so the wheels travel in two ignored folders: .whl-vllm/ (31 wheels,
# ~16 MB) and .whl-vllm2/ (xgrammar, ~45 MB). Run this in each call with the folder(s) it carried;
# pip --target keeps what an earlier call put in /tmp/vsite.
#   bash tools/gpu/vllm-deps.sh [DIR...]    # default: .whl-vllm*/ in the repo root
set -u
cd "$(dirname "$0")/../.."
shopt -s nullglob
dirs=("$@"); [ ${#dirs[@]} -gt 0 ] || dirs=(.whl-vllm*/)
wheels=(); for d in "${dirs[@]}"; do wheels+=("${d%/}"/*.whl); done
[ ${#wheels[@]} -gt 0 ] || { echo "vllm-deps: no wheels in ${dirs[*]:-.whl-vllm*/}" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vsite "${wheels[@]}" || exit 1
echo "vllm-deps: ${#wheels[@]} wheels installed in /tmp/vsite; put them ahead of the image's packages:"
echo "  export PYTHONPATH=/tmp/vsite:\$PYTHONPATH"
