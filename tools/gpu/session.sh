#!/usr/bin/env bash
# The GPU test machine's run (H100, torch 2.11.0+cu130 preinstalled, no network, no nox):
# build flash-attn for `hopper` with blackwheel, then install it and run the kernel tests, the
# benchmark and the #1969 reproduction. Sources come from .stage/mirror (offline), Python wheels
# blackwheel needs beyond the machine's from .whl/. Results go to $OUT (or ./gpu-out).
#   tools/gpu/session.sh start   # start the build in the background, follow it for up to 9 minutes
#   tools/gpu/session.sh finish  # wait for the build, then test, bench, repro; collect results
#   tools/gpu/session.sh repro   # only the #1969 reproduction, one diagnostic unit (~8 min on 16 cores)
set -u
cd "$(dirname "$0")/../.."
RES=$PWD/gpu-out            # everything lands here; packed into $OUT/gpu-results.tgz at the end
mkdir -p "$RES"
export PYTHONPATH=$PWD/src BLACKWHEEL_MIRROR=$PWD/.stage/mirror BLACKWHEEL_OFFLINE=1 \
       BLACKWHEEL_CACHE=/tmp/bw-cache BLACKWHEEL_WHEELHOUSE=$PWD/wheelhouse PYTHONUNBUFFERED=1
python3 -c "import elftools" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .whl/*.whl
LOG=/tmp/fa-build.log

follow() {  # print progress until the build ends or $1 seconds pass
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    if grep -qE "^(built |reused |blackwheel: )" $LOG 2>/dev/null; then return 0; fi
    sleep 15; grep -E "units|building" $LOG | tail -1
  done
  return 1
}

case "${1:-}" in
start)
  nproc; free -g | head -2; nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
  python3 -m blackwheel.cli doctor --json > "$RES/doctor-h100.json" 2>&1
  setsid nohup python3 -m blackwheel.cli build flash-attn --target hopper > $LOG 2>&1 < /dev/null &
  sleep 5
  # the #1969 reproduction at low priority: it fills cores the build's long tail leaves idle
  setsid nohup nice -n 15 python3 -m blackwheel.cli repro-1969 --units 3 --out "$PWD/gpu-repro" \
      > /tmp/repro.log 2>&1 < /dev/null &
  follow 540; tail -3 $LOG ;;
finish)
  pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu-results.tgz" -C "$RES" . && ls -la "$OUT"; }
  trap pack EXIT
  follow 560 || { echo "build still running"; tail -3 $LOG; exit 3; }
  cp $LOG "$RES/flash-attn-build.log"
  cp wheelhouse/*/hopper/*.manifest.json "$RES/" 2>/dev/null
  python3 -m pip install -q --no-deps --no-index wheelhouse/*/hopper/flash_attn-*.whl || exit 4
  BLACKWHEEL_RESULTS="$RES/gpu-tests.jsonl" python3 -m pytest tests/gpu/test_flash_attn.py tests/gpu/test_attention_ref.py -q -p no:cacheprovider --junitxml="$RES/gpu-tests.xml" 2>&1 | tail -25
  python3 -m blackwheel.bench --out "$RES/bench" --wheelhouse wheelhouse 2>&1 | tail -15
  python3 -m blackwheel.cli report "$RES/bench/bench.json" --tests "$RES/gpu-tests.jsonl" --out "$RES/report" 2>&1 | tail -3
  while pgrep -f repro-1969 >/dev/null; do sleep 10; done
  cp gpu-repro/* /tmp/repro.log "$RES/" 2>/dev/null; tail -5 /tmp/repro.log ;;
repro)
  python3 -m blackwheel.cli repro-1969 --units 1 --out "${OUT:-$RES}" --name repro-1969-h100 ;;
*) echo "usage: $0 start|finish|repro"; exit 2 ;;
esac
