#!/usr/bin/env bash
# The GPU test machine's vLLM run (torch 2.11.0+cu130 preinstalled, no network, no nox): build
# vLLM for a target offline from a source bundle (`blackwheel bundle`), then verify and inspect it.
# A call carries at most 64 MiB, so the bundle travels split in two: .bundle-a/ then .bundle-b/
# (split -b 42M; the parts are joined and the bundle's own checks verify every pin).
#   tools/gpu/vllm.sh setup          # wheels blackwheel and vLLM's build need; memory filled once
#   tools/gpu/vllm.sh start TARGET   # join the bundle, start the build in the background, follow it
#   tools/gpu/vllm.sh follow         # follow the build for up to 9 minutes more
#   tools/gpu/vllm.sh collect        # manifest, verify, inspect, cuobjdump, log into $OUT
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH BLACKWHEEL_CACHE=/tmp/bw-cache \
       BLACKWHEEL_WHEELHOUSE=$PWD/wheelhouse BLACKWHEEL_OFFLINE=1 PYTHONUNBUFFERED=1
LOG=/tmp/vllm-build.log
OUT=${OUT:-$PWD/gpu-out}

follow() {  # progress lines until the build ends or $1 seconds pass
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt $until ]; do
    if grep -qE "^(built |reused |blackwheel: )" $LOG 2>/dev/null; then tail -4 $LOG; return 0; fi
    sleep 20; grep -E "units|building|note:" $LOG | tail -1
  done
  return 1
}

case "${1:-}" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 5
  nproc; nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
  gcc --version | head -1; nvcc --version | tail -1; cmake --version | head -1
  python3 -c "import torch, setuptools, setuptools_scm, setuptools_rust; print('torch', torch.__version__, 'setuptools', setuptools.__version__)"
  free -g | head -2
  # this VM's memory grows as it is used: touch 96 GiB once so job planning sees the machine
  python3 - <<'PY'
import numpy as np
from multiprocessing import Pool
def touch(_):
    a = np.ones(12 << 30, dtype=np.uint8); return int(a[::1 << 20].sum() > 0)
if __name__ == "__main__":
    with Pool(8) as pool:
        print("filled GiB:", 12 * sum(pool.map(touch, range(8))))
PY
  free -g | head -2 ;;
start)
  # part a was copied to /tmp by an earlier call (only carried paths stay in the tree)
  cat /tmp/bwpart.00 .bundle-b/bwpart.01 > /tmp/vllm.bwb && sha256sum /tmp/vllm.bwb
  setsid nohup python3 -m blackwheel.cli build vllm --target "${2:?target}" \
      --mirror /tmp/vllm.bwb > $LOG 2>&1 < /dev/null &
  follow 500 ;;
follow)
  follow 560 ;;
collect)
  mkdir -p "$OUT"
  W=$(ls wheelhouse/*/*/vllm-*.whl | head -1)
  ls -la "$W"; cp "$W.manifest.json" "$OUT/"
  python3 -m blackwheel.cli inspect "$W" --json > "$OUT/inspect-ours.json"
  # the build's own verdict (the recipe's required cubins and PTX-only allowance): in the manifest
  python3 -c "import json,sys; v=json.load(open(sys.argv[1]))['verify']; print('verify ok:', v['ok']); print(*v.get('notes', []), sep='\n')" \
      "$W.manifest.json" | tee "$OUT/verify.txt"
  rm -rf /tmp/whl && mkdir /tmp/whl && (cd /tmp/whl && python3 -m zipfile -e "$W" .)
  for so in $(find /tmp/whl -name "*.so" | sort); do
    echo "== ${so#/tmp/whl/}"; cuobjdump --list-elf --list-ptx "$so" 2>&1 | sed -E 's/.*\.(sm_[0-9]+[af]?)\..*/\1/; s/.*\.(compute_[0-9]+[af]?)\..*/\1/' | sort | uniq -c
  done > "$OUT/cuobjdump.txt"
  gzip -c $LOG > "$OUT/build.log.gz"; tail -30 $LOG ;;
*)
  echo "usage: $0 setup | start TARGET | follow | collect" >&2; exit 2 ;;
esac
