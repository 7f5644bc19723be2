#!/usr/bin/env bash
# The GPU test machine's FlashInfer run (torch 2.11.0+cu130 preinstalled, no network, no nox): build a
# kernel set for `hopper` offline from a source bundle that carries upstream's tests too
# (`blackwheel bundle flashinfer --with-tests`), check it against the recorded hopper trace, install it,
# and run upstream's own tests against it with JIT disabled, recording the trace of every module
# FlashInfer's dispatcher asked for. The same set for `gb10` compiles beside the tests (CPU only: no 12.x
# GPU here) and is checked against the gb10 trace with `verify --trace`.
#   tools/gpu/flashinfer.sh start [SET]   # wheels, then build + install + tests in the background; follow
#   tools/gpu/flashinfer.sh follow        # follow for up to 9 minutes more
#   tools/gpu/flashinfer.sh collect       # manifests, counts, traces, logs (one .tgz) and the hopper
#                                         # wheel's first 3 parts (16 MiB each) into $OUT
#   tools/gpu/flashinfer.sh collect-rest  # the wheel's other parts (at most 8 files come back a call)
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
python3 -m blackwheel.cli verify wheelhouse/*/hopper/flashinfer_python-*.whl --target hopper \
    --trace recipes/traces/flashinfer-0.6.13-hopper.json > $RES/verify-hopper.txt 2>&1; tail -3 $RES/verify-hopper.txt
# gb10: CPU only, beside the GPU tests
( python3 -m blackwheel.cli build flashinfer --target gb10 --kernels $SET --jobs 8 > $RES/build-gb10.log 2>&1 &&
  python3 -m blackwheel.cli verify wheelhouse/*/gb10/flashinfer_python-*.whl --target gb10 \
      --trace recipes/traces/flashinfer-0.6.13-gb10.json > $RES/verify-gb10.txt 2>&1
  echo "GB10-END \$? after \$(( \$(date +%s) - start )) s" ) &
gb10=\$!
python3 -m pip install -q --no-deps --no-index --target /tmp/fi-site wheelhouse/*/hopper/flashinfer_python-*.whl || { echo RUN-END install failed; exit 1; }
export PYTHONPATH=/tmp/fi-site:\$PYTHONPATH
one() {  # one upstream file: NAME XDIST CAP_S
  local path
  case \$1 in sampling|norm|activation) path=tests/utils/test_\$1.py ;; page|rope) path=tests/attention/test_\$1.py ;;
              shared_prefix) path=tests/attention/test_shared_prefix_kernels.py ;;
              *) path=tests/attention/test_\$1_kernels.py ;; esac
  echo "TEST \$1 starts after \$(( \$(date +%s) - start )) s"
  # a work folder per file: test-upstream keeps its junit/trace files there, and the lanes run at once
  # --deadline-s ends the file on time with its counts; timeout is only the backstop for a hang
  BLACKWHEEL_WORKDIR=/tmp/bw-work/\$1 timeout \$(( \$3 + 90 )) python3 -m blackwheel.cli test-upstream flashinfer \
      --kernels $SET --only \$path --deadline-s \$3 --pytest-args "\$2" --out $RES/\$1 > $RES/\$1.log 2>&1
  echo "TEST \$1 exit \$? after \$(( \$(date +%s) - start )) s"; tail -3 $RES/\$1.log
}
# three lanes on the one GPU. The attention files run serially: under pytest-xdist the prefill and
# cascade files made no progress twice (docs/reports/flashinfer-kernel-sets-h200.md). Caps from that
# run: rope reached 82 % in 420 s with 6 workers, sampling 71 % in 360 s with 2.
( one batch_prefill "" 600; one shared_prefix "" 300; one batch_decode "" 600 ) & l1=\$!
( one rope "-n 6" 600; one page "" 60 ) & l2=\$!
( one sampling "-n 4" 600; one norm "" 90; one activation "" 120 ) & l3=\$!
wait \$l1 \$l2 \$l3
echo "TEST all files done after \$(( \$(date +%s) - start )) s"
wait \$gb10
echo "RUN-END after \$(( \$(date +%s) - start )) s"
SH
  chmod +x /tmp/fi-run.sh
  setsid nohup /tmp/fi-run.sh > $LOG 2>&1 < /dev/null &
  follow ${FOLLOW_S:-520} ;;
follow)
  follow ${FOLLOW_S:-540} ;;
collect)
  mkdir -p "$OUT" /tmp/fi-coll
  cp $LOG /tmp/fi-coll/ 2>/dev/null
  cp wheelhouse/*/*/*.manifest.json /tmp/fi-coll/ 2>/dev/null
  cp -r $RES /tmp/fi-coll/res
  tar czf "$OUT/fi-res.tgz" -C /tmp/fi-coll .
  whl=$(ls wheelhouse/*/hopper/flashinfer_python-*.whl) && sha256sum "$whl" | tee "$OUT/wheel.sha256"
  rm -rf /tmp/fi-parts && mkdir /tmp/fi-parts && split -b 16000000 -d -a 2 "$whl" /tmp/fi-parts/$(basename "$whl").part-
  cp /tmp/fi-parts/*.part-0[0-2] "$OUT/" 2>/dev/null
  ls -la "$OUT" /tmp/fi-parts ;;
collect-rest)
  mkdir -p "$OUT"; cp /tmp/fi-parts/*.part-0[3-9] "$OUT/" 2>/dev/null; ls -la "$OUT" ;;
*)
  echo "usage: $0 start [SET] | follow | collect | collect-rest" >&2; exit 2 ;;
esac
