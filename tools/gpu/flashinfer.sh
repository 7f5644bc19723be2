#!/usr/bin/env bash
# The GPU test machine's FlashInfer run (torch 2.11.0+cu130 preinstalled, no network, no nox): build a
# kernel set for `hopper` offline from a source bundle that carries upstream's tests too
# (`blackwheel bundle flashinfer --with-tests`), install it, and run upstream's own tests against it
# with JIT disabled, recording the trace of every module FlashInfer's dispatcher asked for.
#   tools/gpu/flashinfer.sh start [SET]   # wheels, then build + install + tests in the background; follow
#   tools/gpu/flashinfer.sh follow        # follow for up to 9 minutes more
#   tools/gpu/flashinfer.sh collect       # manifest, counts, trace, logs into $OUT
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH BLACKWHEEL_CACHE=/tmp/bw-cache \
       BLACKWHEEL_WHEELHOUSE=$PWD/wheelhouse BLACKWHEEL_OFFLINE=1 PYTHONUNBUFFERED=1 \
       BLACKWHEEL_MIRROR=/tmp/fi.bwb BLACKWHEEL_WORKDIR=/tmp/bw-work
LOG=/tmp/fi-run.log
RES=/tmp/fi-res
OUT=${OUT:-$PWD/gpu-out}

follow() {  # progress lines until the run ends or $1 seconds pass
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    if grep -q "^RUN-END" $LOG 2>/dev/null; then tail -25 $LOG; return 0; fi
    sleep 20; grep -E "modules|built|passed|failed|^==|TEST " $LOG | tail -1
  done
  return 1
}

case "${1:-}" in
start)
  SET=${2:-default}
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 5
  cp .bundle-fi/fi.bwb /tmp/fi.bwb || exit 6
  nproc; nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
  mkdir -p $RES
  cat > /tmp/fi-run.sh <<SH
#!/bin/bash
set -x
start=\$(date +%s)
python3 -m blackwheel.cli build flashinfer --target hopper --kernels $SET --jobs 16 || { echo RUN-END build failed; exit 1; }
echo "TEST build done after \$(( \$(date +%s) - start )) s"
python3 -m pip install -q --no-deps --no-index --target /tmp/fi-site wheelhouse/*/hopper/flashinfer_python-*.whl || { echo RUN-END install failed; exit 1; }
export PYTHONPATH=/tmp/fi-site:\$PYTHONPATH
for only in tests/utils/test_norm.py tests/utils/test_activation.py tests/attention/test_page.py \
            tests/attention/test_rope.py tests/attention/test_shared_prefix_kernels.py \
            tests/utils/test_sampling.py tests/attention/test_batch_decode_kernels.py \
            tests/attention/test_batch_prefill_kernels.py; do
  name=\$(basename \$only .py)
  xdist=""; case \$name in *kernels) xdist="-n 4" ;; esac   # the long attention files: 4 processes, one GPU
  echo "TEST \$name starts after \$(( \$(date +%s) - start )) s"
  timeout 900 python3 -m blackwheel.cli test-upstream flashinfer --kernels $SET --only \$only \
      --pytest-args "\$xdist" --out $RES/\$name > $RES/\$name.log 2>&1
  tail -4 $RES/\$name.log
done
echo "RUN-END after \$(( \$(date +%s) - start )) s"
SH
  chmod +x /tmp/fi-run.sh
  setsid nohup /tmp/fi-run.sh > $LOG 2>&1 < /dev/null &
  follow 500 ;;
follow)
  follow 540 ;;
collect)
  mkdir -p "$OUT"
  cp $LOG "$OUT/" 2>/dev/null
  cp wheelhouse/*/hopper/*.manifest.json "$OUT/" 2>/dev/null
  tar czf "$OUT/fi-res.tgz" -C $RES . 2>/dev/null
  ls -la "$OUT" ;;
*)
  echo "usage: $0 start [SET] | follow | collect" >&2; exit 2 ;;
esac
