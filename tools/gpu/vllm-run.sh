#!/usr/bin/env bash
# The GPU test machine's vLLM *run* (no network, no nox): our vLLM wheel for `hopper` (built elsewhere
# and carried in parts, a call carries at most 64 MiB), vLLM's runtime wheels (tools/gpu/vllm-deps.sh),
# and the FlashInfer `default` set built here from the source bundle; then vLLM's own tests/kernels and
# the tiny-model end-to-end test with both attention backends. Results go to $OUT.
#   tools/gpu/vllm-run.sh stage DIR     # keep the parts carried in DIR (*.part-NN) in /tmp/stage
#   tools/gpu/vllm-run.sh flashinfer    # FlashInfer `default` for hopper from .bundle-fi/, in the background
#   tools/gpu/vllm-run.sh install       # join the parts, install vllm, its runtime wheels and FlashInfer
#   tools/gpu/vllm-run.sh kernels       # vLLM's tests/kernels from the sdist (test-upstream vllm)
#   tools/gpu/vllm-run.sh e2e           # tests/gpu/test_vllm_e2e.py: FlashInfer and FlashAttention backends
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/vsite:/tmp/site:$PWD/src PATH=/tmp/vsite/bin:/tmp/site/bin:$PATH \
       BLACKWHEEL_CACHE=/tmp/bw-cache BLACKWHEEL_WHEELHOUSE=/tmp/wheelhouse BLACKWHEEL_OFFLINE=1 \
       BLACKWHEEL_WORKDIR=/tmp/bw-work PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
FI_LOG=/tmp/fi-build.log

case "${1:-}" in
stage)
  mkdir -p /tmp/stage && cp -v "${2:?folder of carried parts}"/* /tmp/stage/ && ls -la /tmp/stage ;;
flashinfer)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 5
  cp .bundle-fi/fi.bwb /tmp/fi.bwb
  BLACKWHEEL_MIRROR=/tmp/fi.bwb setsid nohup python3 -m blackwheel.cli build flashinfer --target hopper \
      --kernels default --jobs 16 > $FI_LOG 2>&1 < /dev/null &
  sleep 5; tail -3 $FI_LOG ;;
install)
  # parts: NAME.whl.part-00, -01, ...: joined in order; the wheel's own RECORD is checked by pip
  for first in /tmp/stage/*.part-00; do
    whl=/tmp/stage/$(basename "$first" .part-00)
    cat "${whl}".part-* > "$whl" && sha256sum "$whl"
  done
  bash tools/gpu/vllm-deps.sh || exit 6
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vsite /tmp/stage/vllm-*.whl || exit 7
  until grep -qE "^(built |reused |blackwheel: )" $FI_LOG 2>/dev/null; do sleep 10; done; tail -2 $FI_LOG
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vsite \
      /tmp/wheelhouse/*/hopper/flashinfer_python-*.whl || exit 8
  python3 -c "import vllm, flashinfer; print('vllm', vllm.__version__, 'flashinfer', flashinfer.__version__)" ;;
kernels)
  mkdir -p "$OUT"
  # the sdist (tests/kernels) from a mirror folder carried as .vllm-src/pypi/vllm-<version>.tar.gz
  python3 -m blackwheel.cli test-upstream vllm --mirror "${2:-$PWD/.vllm-src}" \
      --pytest-args "${3:--q}" --out "$OUT" 2>&1 | tail -30 ;;
e2e)
  mkdir -p "$OUT"
  BLACKWHEEL_GPU_RESULTS="$OUT" BLACKWHEEL_VLLM_E2E_EAGER="${EAGER:-0}" python3 -m pytest tests/gpu/test_vllm_e2e.py \
      -q -p no:cacheprovider --junitxml="$OUT/vllm-e2e.xml" 2>&1 | tail -30 ;;
*)
  echo "usage: $0 stage DIR | flashinfer | install | kernels [MIRROR] | e2e" >&2; exit 2 ;;
esac
