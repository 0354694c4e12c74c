#!/usr/bin/env bash
# One device call that spends a short GPU lease in order of value, each step cut to the time left,
# so that whatever the lease allows comes back (docs/cuda.md, "A GPU session"):
#
# CUTLASS: the sm_90a kernels (sm90 forward) need CUTLASS's headers, and the GPU machine has no
# network. Before the call run `make cutlass-wheel` here (the pinned nvidia-cutlass wheel into .deps/,
# git-ignored) and give the device tool `carry: [".deps"]` (6.4 MB); gpu_check.sh installs it there
# (pip --no-deps --no-index --target build/cutlass-site). Without it the build leaves the sm90
# kernels out, the summary says so and the sm90 tests fail.
#
#   check  make gpu-check: build (with the fa2 tuning tiles), the CUDA tests, the quick benchmark
#   build  gpu_check.sh's build alone (no tests): the start of a session that debugs one kernel, e.g.
#          QKV_LEASE_STEPS="build sm90 sass" (about 4 minutes on the H100 host)
#   sm90   the opt-in Hopper forward (QKV_CUDA_KERNEL=sm90; about 2 minutes): scripts/sm90_smoke.py
#          under a time limit (after a hang each case alone, to name it), the sm90 cases of
#          tests/test_cuda.py (-k sm90 -s: every case prints its errors and fa2's, a mismatch where
#          it is), compute-sanitizer memcheck on two smoke cases, and the forward timed against fa2,
#          flash and cuDNN (cuda_tune.py --sm90 --default-tiles: D 128 and 64, L 1024 and 4096)
#   decode the split-KV decode forward (QKV_CUDA_DECODE, opt-in): its tests/test_cuda.py cases again
#          (forced; the check step runs them among the rest), then scripts/cuda_decode_bench.py: decode
#          L 1, S 4096-16384, batch 1/4/32, H 16 (and GQA 4:1), D 128, bf16: default vs generic vs
#          split vs SDPA (about 20 s)
#   sass   scripts/cuda_sass_check.py on that build: registers, spills, the instructions per kernel
#   tune   scripts/cuda_tune.py on D 128 and 64: fa2 tiles against mma, SDPA's flash and cuDNN
#   race   compute-sanitizer racecheck, then memcheck, on one fa2 forward+backward per head dim and
#          the split decode kernels (1, 4, 8 rows per block, float32 D 256)
#   ncu    Nsight Compute on each kernel of a training step (default path, then generic)
#   stalls Nsight Compute's warp-state, scheduler and source-counter sections of the fa2 kernels:
#          where their warps wait (the fa2 backward issued in 20% of cycles on 2026-11-26)
#   tune2  scripts/cuda_tune.py on D 96 and 256
#   cpu    the CPU targets benchmark on the host's cores (issue 16)
#   amx    the opt-in AMX bfloat16 forward (issue 16; about 3 minutes where the host has AMX):
#          tests/test_cpu_amx.py (its hardware cases run only there), the core forward tests on
#          every capability, then the bfloat16 targets benchmark with QKV_CPU_CAPABILITY=amx and
#          unset (avx512), each into its own folder
# Then benchmarks/results/ and the logs are packed into $OUT/lease.tgz, and the summaries printed
# last (the device tool returns the end of the output).
#
#   QKV_LEASE_SECONDS  deadline for everything (default 540); a step gets min(its cap, time left)
#   QKV_LEASE_STEPS    the steps to run, in order (default "check sm90 decode sass tune race ncu stalls tune2 cpu amx")
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUTDIR="${OUT:-$PWD/lease-out}"
LOGS="$PWD/lease-logs"
mkdir -p "$OUTDIR" "$LOGS"
T0=$(date +%s)
BUDGET="${QKV_LEASE_SECONDS:-540}"
RESERVE=25  # packing the results
now() { echo $(( $(date +%s) - T0 )); }

# step NAME CAP COMMAND...: runs COMMAND under `timeout`, at most CAP seconds and never past the deadline.
step() {
  local name=$1 cap=$2 left limit rc
  shift 2
  left=$(( BUDGET - RESERVE - $(now) ))
  limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    echo "[lease $(now)s] $name: skipped, ${left}s left" | tee -a "$LOGS/steps.txt"
    return
  fi
  echo "[lease $(now)s] $name: start, limit ${limit}s" | tee -a "$LOGS/steps.txt"
  timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "[lease $(now)s] $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (time limit)')" | tee -a "$LOGS/steps.txt"
}

race_case() {
  cat >"$LOGS/race_case.py" <<'EOF'
import torch, qkv  # noqa: F401
for d in (64, 96, 128, 256):
    q, k, v = (torch.randn(1, 2, 200, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        out = torch.ops.qkv.attention(q, k, v, None, 0.0, causal, True)[0]
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
# The split-KV decode kernels (opt-in): 1, 4 and 8 query rows per block, float32's two-chunk lanes.
import os
os.environ.update(QKV_CUDA_KERNEL="auto", QKV_CUDA_DECODE="split-required")
for dtype, d, hk, l in ((torch.bfloat16, 128, 8, 1), (torch.float16, 64, 2, 1), (torch.bfloat16, 128, 2, 2),
                        (torch.float32, 256, 8, 1)):
    q = torch.randn(2, 8, l, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, hk, 1500, d, device="cuda", dtype=dtype) for _ in range(2))
    torch.ops.qkv.attention(q, k, v, None, 0.0, True, True)
torch.cuda.synchronize()
print("race case done")
EOF
  for tool in racecheck memcheck; do
    QKV_CUDA_KERNEL=fa2 PYTHONPATH=python compute-sanitizer --tool "$tool" --print-limit 20 "$PY" "$LOGS/race_case.py" \
      >"$LOGS/sanitizer-$tool.log" 2>&1
    echo "$tool exit $?: $(grep -E 'ERROR SUMMARY|race case done' "$LOGS/sanitizer-$tool.log" | tr '\n' ' ')"
  done
}

sm90_step() {
  local n i rc
  echo "-- smoke: scripts/sm90_smoke.py (every case in one process, 40 s; after a hang, each case alone)"
  PYTHONPATH=python timeout -k 5 40 "$PY" scripts/sm90_smoke.py
  rc=$?
  if ((rc == 124 || rc == 137)); then
    n="$("$PY" scripts/sm90_smoke.py --list)"
    for ((i = 0; i < n; i++)); do
      PYTHONPATH=python timeout -k 3 12 "$PY" scripts/sm90_smoke.py --case "$i" >/dev/null 2>&1
      rc=$?
      case $rc in 0) echo "case $i: ok" ;; 1) echo "case $i: WRONG" ;; 124 | 137) echo "case $i: HANG" ;;
        *) echo "case $i: crashed (exit $rc)" ;; esac
    done
  fi
  echo "-- tests/test_cuda.py -k sm90 (each case prints its errors and fa2's)"
  PYTHONPATH=python timeout -k 5 75 "$PY" -m pytest -q -s -p no:cacheprovider -rf --tb=short tests/test_cuda.py -k sm90 \
    2>&1 | grep -vE '^\s*$' | tail -n 150
  echo "-- compute-sanitizer memcheck, smoke cases 2 and 3"
  for i in 2 3; do
    PYTHONPATH=python timeout -k 5 30 compute-sanitizer --tool memcheck --print-limit 10 "$PY" scripts/sm90_smoke.py \
      --case "$i" 2>&1 | grep -E 'ERROR SUMMARY|Invalid|out of bounds|^case [0-9]' | head -n 15
  done
  echo "-- timing: sm90 vs fa2 vs SDPA flash/cuDNN (forward, bf16)"
  PYTHONPATH=python timeout -k 5 40 "$PY" scripts/cuda_tune.py --dims 128,64 --lengths 1024,4096 --modes fwd --sm90 \
    --default-tiles --no-mma --rounds 3 --matmul-n 4096 --json "$LOGS/cuda_tune_sm90.json" 2>&1 |
    grep -E '^\||dropped|cuda_tune'
}

decode_step() {
  local workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${QKV_TEST_WORKERS:-8}")
  PYTHONPATH=python "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" tests/test_cuda.py -k split_decode 2>&1 |
    tail -n 25
  PYTHONPATH=python "$PY" scripts/cuda_decode_bench.py --json "$LOGS/cuda_decode_bench.json"
}

ncu_kernels() {
  local metrics
  metrics="$(ncu --query-metrics 2>/dev/null | "$PY" scripts/gpu_check.py ncu-metrics)"
  PYTHONPATH=python ncu --profile-from-start off --csv --page raw --metrics "$metrics" \
    "$PY" scripts/gpu_profile_kernels.py >"$LOGS/ncu.csv" 2>"$LOGS/ncu.err" || return 1
  "$PY" scripts/gpu_check.py ncu-summary "$LOGS/ncu.csv" "$metrics"
}

export LOGS PY
export -f race_case ncu_kernels decode_step sm90_step  # run under `timeout` through bash -c
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader >"$LOGS/gpu.txt" 2>&1
git log --oneline -1 >"$LOGS/commit.txt" 2>&1
for s in ${QKV_LEASE_STEPS:-check sm90 decode sass tune race ncu stalls tune2 cpu amx}; do
  case "$s" in
    check) step check 400 env NVCC_APPEND_FLAGS=-DQKV_FA2_TUNING QKV_GPU_CHECK_NCU=0 QKV_GPU_CHECK_TEST_TIMEOUT=240 \
             QKV_GPU_CHECK_BENCH_TIMEOUT=90 QKV_GPU_CHECK_OUT="$LOGS/gpu-check-files" PYTHON="$PY" scripts/gpu_check.sh ;;
    build) step build 240 env QKV_GPU_CHECK_BUILD_ONLY=1 QKV_GPU_CHECK_OUT="$LOGS/gpu-check-files" PYTHON="$PY" \
             scripts/gpu_check.sh ;;
    sm90) step sm90 150 bash -c sm90_step ;;
    decode) step decode 75 bash -c decode_step ;;
    sass) step sass 30 "$PY" scripts/cuda_sass_check.py python/qkv ;;
    tune) step tune 130 env PYTHONPATH=python "$PY" scripts/cuda_tune.py --dims 128,64 --json "$LOGS/cuda_tune.json" ;;
    race) step race 60 bash -c race_case ;;
    ncu) command -v ncu >/dev/null && step ncu 60 bash -c ncu_kernels ;;
    stalls) command -v ncu >/dev/null && step stalls 60 env PYTHONPATH=python ncu --profile-from-start off \
              -k regex:fa2_ --section WarpStateStats --section SchedulerStats --section SourceCounters \
              "$PY" scripts/gpu_profile_kernels.py ;;
    tune2) step tune2 120 env PYTHONPATH=python "$PY" scripts/cuda_tune.py --dims 96,256 --no-mma \
             --json "$LOGS/cuda_tune_96_256.json" ;;
    cpu) step cpu 150 env PYTHONPATH=python "$PY" -m qkv.bench --device cpu --cases targets --no-progress ;;
    amx) step amx 240 bash -c '
           grep -o "amx_tile\|amx_bf16\|avx512_bf16" /proc/cpuinfo | sort | uniq -c
           PYTHONPATH=python '"$PY"' -m pytest -p no:cacheprovider -q -rs tests/test_cpu_amx.py tests/test_core_forward.py 2>&1 | tail -n 25
           grep -q amx_bf16 /proc/cpuinfo || { echo "no AMX on this host: no benchmark"; exit 0; }
           for c in amx avx512; do
             echo "== bfloat16 targets, QKV_CPU_CAPABILITY=$c"
             QKV_CPU_CAPABILITY=$c PYTHONPATH=python '"$PY"' -m qkv.bench --device cpu --dtype bfloat16 \
               --cases long2k-fwd,long2k-d128-fwd,long2k-fwdbwd,mid-fwd --no-memory --no-plots --no-progress \
               --out "benchmarks/results/cpu-amx-host-bfloat16-$c" 2>&1 | grep -E "^\||capability"
           done' ;;
    *) echo "unknown step $s" ;;
  esac
done

tar czf "$OUTDIR/lease.tgz" benchmarks/results "$(basename "$LOGS")" 2>/dev/null
echo
echo "==== steps"; cat "$LOGS/steps.txt"
for f in gpu-check-files/gpu-check-summary.txt; do [[ -f "$LOGS/$f" ]] && { echo "==== $f"; cat "$LOGS/$f"; }; done
echo "==== failed tests (from the log: complete even when the run was cut short)"
grep -hE '(FAILED|ERROR) tests/' benchmarks/results/*/gpu-check-tests.log 2>/dev/null | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort | uniq | head -40
grep -hE '^[0-9]+ (passed|failed)|[0-9]+ passed' benchmarks/results/*/gpu-check-tests.log 2>/dev/null | tail -2
for t in tune tune2; do
  [[ -f "$LOGS/$t.log" ]] || continue
  echo "==== $t"
  if grep -q 'geomean x flash' "$LOGS/$t.log"; then sed -n '/geomean x flash/,$p' "$LOGS/$t.log"; else tail -n 30 "$LOGS/$t.log"; fi
done
echo "==== sm90"; cat "$LOGS/sm90.log" 2>/dev/null | tail -n 120
echo "==== decode"; grep -E 'passed|failed|FAILED|Error|\| split \||split vs sdpa|dropped' "$LOGS/decode.log" 2>/dev/null | head -40
echo "==== sass"; tail -n 3 "$LOGS/sass.log" 2>/dev/null
echo "==== race"; cat "$LOGS/race.log" 2>/dev/null
echo "==== ncu"; head -40 "$LOGS/ncu.log" 2>/dev/null
echo "==== stalls"; grep -E 'fa2_|Stall|stall|Issued|Eligible|Active Warps' "$LOGS/stalls.log" 2>/dev/null | head -40
echo "==== cpu"; grep -E '^\|' "$LOGS/cpu.log" 2>/dev/null | tail -25
echo "==== amx"; tail -n 40 "$LOGS/amx.log" 2>/dev/null
echo "[lease $(now)s] done"
