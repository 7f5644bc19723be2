#!/usr/bin/env bash
# The GPU test machine's vLLM run (no network, no nox). Everything travels through tools/gpu/carry.sh:
# our vLLM wheel for `hopper` (built elsewhere), our FlashInfer `default` wheel for hopper (built on
# this machine before and brought back), vLLM's runtime wheels (tools/gpu/vllm-deps.sh), FlashInfer's
# (.whl/), the vLLM sdist, whose tests/kernels are vLLM's own kernel tests, and the FlashInfer
# bundle that carries FlashInfer's own tests.
#   here:  tools/gpu/vllm-run.sh pack              # .carry/NN folders: one per call
#   there: tools/gpu/carry.sh stage .carry/NN      # in each call, back to back
#          tools/gpu/vllm-run.sh start             # unpack, install, then tests in the background
#          tools/gpu/vllm-run.sh follow            # follow for up to 9 minutes more
#          tools/gpu/vllm-run.sh collect           # counts, e2e JSON, logs into $OUT (one .tgz)
#          tools/gpu/vllm-run.sh files S GLOB...   # then: one lane per test file, all at once, S s each
#          LANES=0 tools/gpu/vllm-run.sh start; tools/gpu/vllm-run.sh sets   # the kernel-set run instead
#          tools/gpu/vllm-run.sh rest rope '-n 6' 300   # then what a deadline left of a file, counted with it
#          tools/gpu/vllm-run.sh build [SET]           # beside sets: FlashInfer's hopper SET built here (CPUs only)
#          tools/gpu/vllm-run.sh e2e-new [SET]         # after build: vLLM with an FP8 KV cache against that set
# FI_SITE: a folder whose FlashInfer comes first (e2e-new puts the set just built there).
# PRELOAD_LIBCUDA=1: for a vllm wheel built before the libcuda stub exported the driver's symbols
# (its _C and cumem_allocator lack libcuda.so.1 in NEEDED and do not load otherwise).
# The run: first tests/gpu/test_vllm_e2e.py alone (FlashInfer and FlashAttention backends), then
# three lanes on the one GPU, each file with a deadline (test-upstream --deadline-s), so a file that
# runs long still ends with its counts:
#   A: FlashInfer's own attention tests left from the kernel-set run;
#   B: vLLM's tests/kernels/core (layernorm, activation, rotary embedding, positional encoding);
#   C: vLLM's cache tests, then its FlashAttention and FlashInfer attention tests.
set -u
cd "$(dirname "$0")/../.."
UNP=/tmp/unp
export PYTHONPATH=${FI_SITE:+$FI_SITE:}/tmp/vsite:$PWD/src PATH=/tmp/vsite/bin:$PATH BLACKWHEEL_CACHE=/tmp/bw-cache \
       BLACKWHEEL_OFFLINE=1 BLACKWHEEL_WORKDIR=/tmp/bw-work PYTHONUNBUFFERED=1
[ "${PRELOAD_LIBCUDA:-0}" = 1 ] && export LD_PRELOAD=$(ldconfig -p | awk '/libcuda.so.1 /{print $NF; exit}')
OUT=${OUT:-$PWD/gpu-out}
LOG=/tmp/vllm-run.log
RES=/tmp/vllm-res

follow() {  # progress lines until the run ends or $1 seconds pass
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    if grep -q "^RUN-END" $LOG 2>/dev/null; then grep -E "^(LANE|RUN-END)" $LOG | tail -30; return 0; fi
    sleep 20
  done
  grep -E "^LANE" $LOG | tail -8; return 1
}

case "${1:-}" in
pack)   # here: the vLLM and FlashInfer wheels from the wheelhouse, or as named in VLLM_WHL / FI_WHL
  vllm=${VLLM_WHL:-$(ls wheelhouse/*/hopper/vllm-*.whl | head -1)}
  fi=${FI_WHL:-$(ls wheelhouse/*/hopper/flashinfer_python-*.whl | head -1)}
  [ -f "$vllm" ] && [ -f "$fi" ] || { echo "vllm-run: no vllm ($vllm) or flashinfer ($fi) wheel" >&2; exit 2; }
  bash tools/gpu/carry.sh pack "$vllm" "$fi" .whl/*.whl .whl-vllm/*.whl .whl-vllm2/*.whl \
      .vllm-src/pypi/vllm-*.tar.gz .bundle-fi/fi.bwb ;;
start)
  bash tools/gpu/carry.sh unpack $UNP > /tmp/unpack.log 2>&1 || { tail -5 /tmp/unpack.log; exit 5; }
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vsite $UNP/*.whl || exit 6
  mkdir -p /tmp/vmirror/pypi $RES && ln -sf $UNP/vllm-*.tar.gz /tmp/vmirror/pypi/
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
  python3 -c "import vllm, flashinfer, torch; print('vllm', vllm.__version__, 'flashinfer', flashinfer.__version__, 'torch', torch.__version__)" || exit 7
  cp $UNP/fi.bwb /tmp/fi-tests      # the bundle that carries FlashInfer's own tests
  [ "${LANES:-1}" = 0 ] && { echo "installed; LANES=0: no lanes started"; exit 0; }
  cat > /tmp/vllm-lanes.sh <<'SH'
#!/bin/bash
RES=/tmp/vllm-res; start=$(date +%s)
export FLASHINFER_DISABLE_JIT=1   # vLLM's FlashInfer tests too: a module our wheel lacks fails, naming it
say() { echo "LANE $* after $(( $(date +%s) - start )) s"; }
vtests() {  # NAME DEADLINE_S FILE...: vLLM's own tests from the sdist, a work folder per lane
  local name=$1 cap=$2; shift 2
  say "vllm $name starts"
  BLACKWHEEL_WORKDIR=/tmp/bw-work/$name timeout $((cap + 120)) python3 -m blackwheel.cli test-upstream vllm \
      --mirror /tmp/vmirror --only "$@" --deadline-s $cap --out $RES/vllm-$name > $RES/vllm-$name.log 2>&1
  say "vllm $name exit $?"; grep -E "^\| total|PARTIAL" $RES/vllm-$name.log
}
e2e() {   # alone on the GPU: vLLM's memory profiling fails when another process frees memory meanwhile
  say "e2e starts"
  BLACKWHEEL_GPU_RESULTS=$RES/e2e BLACKWHEEL_VLLM_E2E_EAGER=${EAGER:-0} timeout 900 python3 -m pytest \
      tests/gpu/test_vllm_e2e.py -q -p no:cacheprovider --junitxml=$RES/e2e.xml > $RES/e2e.log 2>&1
  say "e2e exit $?"; tail -3 $RES/e2e.log
}
lane_a() {
  for f in batch_prefill:240 shared_prefix:120; do
    BLACKWHEEL_WORKDIR=/tmp/bw-work/fi-${f%:*} timeout $(( ${f#*:} + 120 )) python3 -m blackwheel.cli \
        test-upstream flashinfer --mirror /tmp/fi-tests --only "tests/attention/test_${f%:*}_kernels.py" \
        --deadline-s ${f#*:} --out $RES/fi-${f%:*} > $RES/fi-${f%:*}.log 2>&1
    say "flashinfer ${f%:*} exit $?"
  done
}
lane_b() { vtests core 500 "tests/kernels/core/*"; }
lane_c() { vtests cache 200 "tests/kernels/*cache*.py" "tests/kernels/attention/test_cache.py"
           vtests flash_attn 250 tests/kernels/attention/test_flash_attn.py
           vtests flashinfer 250 tests/kernels/attention/test_flashinfer.py; }
e2e
lane_a & a=$!; lane_b & b=$!; lane_c & c=$!
wait $a $b $c
echo "RUN-END after $(( $(date +%s) - start )) s"
SH
  chmod +x /tmp/vllm-lanes.sh
  setsid nohup /tmp/vllm-lanes.sh > $LOG 2>&1 < /dev/null &
  follow ${FOLLOW_S:-400} ;;
follow)
  follow ${FOLLOW_S:-540} ;;
sets)    # after `LANES=0 start`: the kernel-set run. vLLM end to end with the FlashInfer backend, traced
         # (every FlashInfer module it asks for), head dim 64 compiled as users run it and 128 eager
         # (E2E=0 leaves them out), and 128 compiled with an FP8 KV cache (E2E_FP8=0 leaves it out);
         # then FlashInfer's own files, ONE AT A TIME: side by side, the files'
         # pytest workers filled the GPU's 139 GiB, and what ran out of memory (or stalled: batch prefill
         # beside other lanes gave no result three times) judged the load, not the kernels
         # (docs/reports/flashinfer-kernel-sets-h200.md, fourth run). FILES='NAME:PATH:XDIST:DEADLINE_S;...'
         # Default: rope alone, 6 workers (8 filled the GPU even alone, fifth run), 800 s: about 11 minutes,
         # so follow it with a second call. (Sampling: 'sampling:tests/utils/test_sampling.py:-n 8:420'.)
  cat > /tmp/sets.sh <<'SH'
#!/bin/bash
RES=/tmp/vllm-res; start=$(date +%s)
say() { echo "LANE $* after $(( $(date +%s) - start )) s"; }
e2e() {  # HEAD_DIM EAGER [KV_CACHE_DTYPE]
  local n=hd$1-${3:-auto}
  say "e2e $n starts"
  BLACKWHEEL_TRACE=flashinfer.jit.core:JitSpec.build_and_load BLACKWHEEL_VLLM_E2E_HEAD_DIM=$1 \
  BLACKWHEEL_VLLM_E2E_EAGER=$2 BLACKWHEEL_VLLM_E2E_KV_CACHE_DTYPE=${3:-auto} BLACKWHEEL_GPU_RESULTS=$RES/e2e-$n \
  timeout 600 python3 -m pytest tests/gpu/test_vllm_e2e.py -k FLASHINFER -q -p no:cacheprovider \
      --junitxml=$RES/e2e-$n.xml > $RES/e2e-$n.log 2>&1
  say "e2e $n exit $?"; tail -2 $RES/e2e-$n.log
}
fitest() {   # NAME PATH XDIST DEADLINE_S: one of FlashInfer's own files, within the set's declared coverage
  say "flashinfer $1 starts"
  BLACKWHEEL_WORKDIR=/tmp/bw-work/fi-$1 FLASHINFER_DISABLE_JIT=1 timeout $(( $4 + 120 )) python3 -m blackwheel.cli \
      test-upstream flashinfer --kernels default --mirror /tmp/fi-tests --only "$2" --pytest-args "$3" \
      --deadline-s $4 --out $RES/fi-$1 > $RES/fi-$1.log 2>&1
  say "flashinfer $1 exit $?"; grep -E "^\| total|PARTIAL|OUT OF MEMORY" $RES/fi-$1.log
}
[ "${E2E:-1}" = 1 ] && { e2e 64 0; e2e 128 1; }
# FP8 KV cache: on 9.0 vLLM also quantizes the query to FP8. Compiled, as users run it: eager, vLLM 0.25.1
# stops in its own maybe_quant_query (it asserts a contiguous query; eager hands it a slice of QKV)
[ "${E2E_FP8:-1}" = 1 ] && e2e 128 0 fp8
IFS=';' read -ra items <<< "${FILES-rope:tests/attention/test_rope.py:-n 6:800}"   # FILES= : none
for f in "${items[@]}"; do
  IFS=: read -r name path xdist cap <<< "$f"; fitest "$name" "$path" "$xdist" "$cap"
done
echo "RUN-END after $(( $(date +%s) - start )) s"
SH
  chmod +x /tmp/sets.sh; mkdir -p $RES
  setsid nohup /tmp/sets.sh > $LOG 2>&1 < /dev/null &
  follow ${FOLLOW_S:-500} ;;
build)   # beside sets (CPU only): FlashInfer's hopper SET built here from the carried bundle, niced so
         # the GPU tests keep their cores, then checked against every hopper trace (verify --trace).
         # Its wall time is not a benchmark: it shares the machine. build [SET]; JOBS (default 9)
  set=${2:-default}
  cat > /tmp/fi-build.sh <<SH
#!/bin/bash
start=\$(date +%s)
BLACKWHEEL_MIRROR=$UNP/fi.bwb BLACKWHEEL_WHEELHOUSE=/tmp/wh-$set BLACKWHEEL_WORKDIR=/tmp/bw-build nice -n 10 \\
    python3 -m blackwheel.cli build flashinfer --target hopper --kernels $set --jobs ${JOBS:-9} > $RES/build-$set.log 2>&1
echo "BUILD exit \$? after \$(( \$(date +%s) - start )) s"
for t in recipes/traces/flashinfer-*-hopper*.json; do
  python3 -m blackwheel.cli verify /tmp/wh-$set/*/hopper/flashinfer_python-*.whl --target hopper --trace \$t \\
      > $RES/verify-\$(basename \$t .json).txt 2>&1
  echo "VERIFY \$(basename \$t) exit \$?"
done
cp /tmp/wh-$set/*/hopper/*.manifest.json $RES/ 2>/dev/null
echo "BUILD-END after \$(( \$(date +%s) - start )) s"
SH
  mkdir -p $RES; setsid nohup bash /tmp/fi-build.sh > /tmp/fi-build.log 2>&1 < /dev/null &
  echo "build of $set started (log /tmp/fi-build.log)" ;;
e2e-new) # after build: vLLM end to end with an FP8 KV cache against the set just built, traced
  grep -q "^BUILD exit 0" /tmp/fi-build.log 2>/dev/null || { echo "vllm-run: no built set yet: $(tail -1 /tmp/fi-build.log 2>/dev/null)" >&2; exit 2; }
  whl=$(ls /tmp/wh-${2:-default}/*/hopper/flashinfer_python-*.whl) || exit 2
  python3 -m pip install -q --no-index --no-deps --target /tmp/fi-new "$whl" || exit 6
  FI_SITE=/tmp/fi-new E2E=0 E2E_FP8=${E2E_FP8:-1} FILES= bash "$0" sets ;;
rest)    # after sets: what a partial file left, as one count with it. rest NAME XDIST DEADLINE_S
  name=${2:?name as in FILES} xdist=${3:?e.g. '-n 6'} cap=${4:?seconds}
  BLACKWHEEL_WORKDIR=/tmp/bw-work/fi-$name-rest FLASHINFER_DISABLE_JIT=1 timeout $((cap + 120)) python3 -m blackwheel.cli \
      test-upstream flashinfer --kernels default --mirror /tmp/fi-tests --rest-of $RES/fi-$name --pytest-args "$xdist" \
      --deadline-s $cap --out $RES/fi-$name-all > $RES/fi-$name-all.log 2>&1
  grep -E "^\| total|PARTIAL|OUT OF MEMORY|runs together" $RES/fi-$name-all.log ;;
files)   # after start: each file in a lane of its own, all at once, S seconds each
  cap=${2:?seconds per file}; shift 2; start=$SECONDS
  for f in "$@"; do
    n=$(basename "$f" .py)
    BLACKWHEEL_WORKDIR=/tmp/bw-work/$n FLASHINFER_DISABLE_JIT=1 timeout $((cap + 120)) python3 -m blackwheel.cli \
        test-upstream vllm --mirror /tmp/vmirror --only "$f" --deadline-s $cap --out $RES/again-$n \
        > $RES/again-$n.log 2>&1 &
  done
  wait; echo "files: $# lanes ended after $((SECONDS - start)) s"
  for f in "$@"; do n=$(basename "$f" .py); echo "== $n"; grep -E "^\| total|PARTIAL|^failed in|^skipped in" $RES/again-$n.log | cut -c1-300; done ;;
collect)
  mkdir -p "$OUT"; cp $LOG /tmp/fi-build.log $RES/ 2>/dev/null
  tar czf "$OUT/vllm-res.tgz" -C /tmp vllm-res && ls -la "$OUT" ;;
*)
  echo "usage: $0 pack | start | sets | build [SET] | e2e-new [SET] | follow | rest NAME XDIST S | collect | files S GLOB..." >&2; exit 2 ;;
esac
