#!/usr/bin/env bash
# One prepared GPU run for the fa2 kernels (issue 15), sized for a 15-minute device lease: build in
# place with the tuning tiles, check the fa2 path against the float64 references, race-check one
# small case, then time every tile against the mma kernels and SDPA's flash/cuDNN backends.
# Logs go to $OUT (or ./fa2-gpu-session); the last lines printed are the tuning tables.
#
#   PHASES="build sass test" scripts/fa2_gpu_session.sh   # first device call (fits 600 s)
#   PHASES="tune" scripts/fa2_gpu_session.sh              # second call, right after (warm machine)
#   PHASES="race" scripts/fa2_gpu_session.sh              # optional: compute-sanitizer
#
# Phases (each with its own time limit, so one hang cannot eat the lease):
#   build   QKV_CUDA=1 QKV_CUDA_ARCHS=<the device's> with -DQKV_FA2_TUNING, 16 jobs
#   sass    scripts/cuda_sass_check.py on the fresh build (registers, spills, HMMA/LDSM/LDGSTS)
#   test    tests/test_cuda.py, the fa2 cases first (-x: the first failure stops), then the rest
#   race    compute-sanitizer racecheck and memcheck on one forward+backward of each fa2 head dim
#   tune    scripts/cuda_tune.py over the bench grid
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/fa2-gpu-session}"
mkdir -p "$OUT"
PHASES="${PHASES:-build sass test tune}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

phase() { [[ " $PHASES " == *" $1 "* ]]; }
stamp() { date +%s; }
t0=$(stamp)
log() { echo "[fa2-session $(( $(stamp) - t0 ))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
git log --oneline -1 | tee "$OUT/commit.txt"

if phase build; then
  arch="$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  log "build for sm_${arch/./} with the tuning tiles"
  NVCC_APPEND_FLAGS="-DQKV_FA2_TUNING" QKV_CUDA=1 QKV_CUDA_ARCHS="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
    timeout 300 $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -30 "$OUT/build.log"; exit 1; }
  log "built"
fi

if phase sass; then
  timeout 30 $PY scripts/cuda_sass_check.py python/qkv >"$OUT/sass.txt" 2>&1
  log "sass check exit $?: $(tail -1 "$OUT/sass.txt")"
  grep -E "fa2_(forward|backward)_kernel" "$OUT/sass.txt" | head -40
fi

if phase test; then
  log "tests/test_cuda.py, fa2 cases"
  timeout 150 $PY -m pytest -x -q -p no:cacheprovider tests/test_cuda.py -k "fa2" >"$OUT/test-fa2.log" 2>&1
  log "fa2 cases exit $?: $(tail -1 "$OUT/test-fa2.log")"
  tail -25 "$OUT/test-fa2.log" | grep -E "FAILED|Error|error|passed|failed" | head -20
  log "tests/test_cuda.py, the rest"
  timeout 110 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not fa2" >"$OUT/test-rest.log" 2>&1
  log "other cases exit $?: $(tail -1 "$OUT/test-rest.log")"
fi

if phase race; then
  cat >"$OUT/race_case.py" <<'EOF'
import os, torch, qkv  # noqa: F401
os.environ["QKV_CUDA_KERNEL"] = "fa2"
for d in (64, 96, 128, 256):
    q, k, v = (torch.randn(1, 2, 200, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        out = torch.ops.qkv.attention(q, k, v, None, 0.0, causal, True)[0]
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
torch.cuda.synchronize()
print("race case done")
EOF
  for tool in racecheck memcheck; do
    timeout 200 compute-sanitizer --tool "$tool" --print-limit 20 $PY "$OUT/race_case.py" >"$OUT/sanitizer-$tool.log" 2>&1
    log "compute-sanitizer $tool exit $?: $(grep -E "ERROR SUMMARY|race case done" "$OUT/sanitizer-$tool.log" | tr '\n' ' ')"
  done
fi

if phase tune; then
  log "tuning grid"
  timeout 480 $PY scripts/cuda_tune.py --json "$OUT/cuda_tune.json" >"$OUT/tune.log" 2>&1
  log "tune exit $?"
  tail -80 "$OUT/tune.log"
fi
log "done"
