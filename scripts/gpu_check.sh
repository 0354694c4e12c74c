#!/usr/bin/env bash
# `make gpu-check`: everything a short GPU session needs, in one command, in under 5 minutes, on a
# machine with a GPU and nothing but this repository (no network):
#  1. builds qkv._C in place with CUDA for this GPU's own architecture (gpu_check.py device),
#     with every core, against this python's torch; saves the link command and the check that the
#     library uses the shared C++ runtime. On a 9.0 GPU (H100/H200) that includes the sm_90a kernels,
#     which need CUTLASS's headers: when this python lacks the pinned nvidia-cutlass, the wheel is
#     installed (pip --no-deps --no-index --target build/cutlass-site) from .deps/, where
#     `make cutlass-wheel` put it and the GPU session carried it (GPU machines have no network);
#     without it the build leaves those kernels out and says so;
#  2. runs tests/test_cuda.py, tests/test_errors_in_child.py and the cuda runs of the core tests
#     (every file parametrized over the device, -m "not cpu") so that a test that crashes its
#     process fails alone (pytest-xdist workers, or a resume-after-crash loop), one line per failure;
#  3. runs `python -m qkv.bench --device cuda --quick`;
#  4. when ncu is present, profiles each qkv kernel once (scripts/gpu_profile_kernels.py) and
#     prints registers, occupancy, issue-slot and tensor-pipe utilisation per kernel;
#  5. writes everything into benchmarks/results/<machine>/ (commit it), copies the main files
#     (at most 8) into $QKV_GPU_CHECK_OUT or $OUT when set, and prints a summary.
# Exit status: 0 when the build, the tests and the benchmark passed; 1 otherwise; 2 without a GPU.
#
# Environment: PYTHON (default python3), MAX_JOBS (default: all cores), QKV_TEST_WORKERS (pytest-xdist
# workers, default: one per core), QKV_GPU_CHECK_TEST_TIMEOUT (seconds for all tests, default 600),
# QKV_GPU_CHECK_BENCH_TIMEOUT (seconds for the benchmark, default 600),
# QKV_GPU_CHECK_OUT / OUT (where to copy the files), QKV_GPU_CHECK_NCU=0 (skip ncu),
# QKV_GPU_CHECK_BUILD_ONLY=1 (step 1 only: gpu_lease.sh's `build` step, for a session that runs its own tests).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
HELPER=("$PY" scripts/gpu_check.py)  # imports no qkv: works before the build
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 )) s"; }

device_vars="$("${HELPER[@]}" device)" || exit 2
eval "$device_vars"   # GPU_NAME, GPU_ARCHS, MACHINE, TORCH_VERSION
RESULTS="benchmarks/results/$MACHINE"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/gpu-check-summary.txt"
JOBS="${MAX_JOBS:-$(nproc)}"
{
  echo "gpu-check on $GPU_NAME ($MACHINE), torch $TORCH_VERSION, python $("$PY" -c 'import sys; print(sys.version.split()[0])'), $(nproc) cores"
  if revision="$(git rev-parse --short HEAD 2>/dev/null)"; then
    git diff --quiet HEAD 2>/dev/null || revision+=" (with uncommitted changes)"
  fi
  echo "qkv revision: ${revision:-unknown (not a git checkout)}"
} >"$SUMMARY"
status=0

# ---- 1. build ---------------------------------------------------------------------------------
sm90_note=""
if [[ "$GPU_ARCHS" == 9.0* ]]; then
  cutlass_ready() { "$PY" scripts/build_config.py cutlass-include >/dev/null 2>&1; }
  if ! cutlass_ready; then
    CUTLASS_SITE="$ROOT/build/cutlass-site"
    wheel="$(ls .deps/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)"
    if [[ -n "$wheel" ]]; then
      "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-index --target "$CUTLASS_SITE" "$wheel" \
        >/dev/null 2>&1 || "$PY" -m zipfile -e "$wheel" "$CUTLASS_SITE"  # (a wheel is a zip: no pip needed)
      export PYTHONPATH="$CUTLASS_SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  if cutlass_ready; then
    sm90_note="sm90 kernels: built (CUTLASS $("$PY" scripts/build_config.py cutlass-include))"
  else
    export QKV_CUDA_SM90=0
    sm90_note="sm90 kernels: NOT built: $("$PY" scripts/build_config.py cutlass-include 2>&1 | tail -n 1) (carry .deps/ from \`make cutlass-wheel\`)"
  fi
fi
echo "gpu-check: building qkv._C for CUDA archs $GPU_ARCHS with $JOBS jobs ($(elapsed))"
if QKV_CUDA=1 QKV_CUDA_ARCHS="$GPU_ARCHS" MAX_JOBS="$JOBS" "$PY" setup.py build_ext --inplace \
     --build-temp build/gpu-check >"$RESULTS/gpu-check-build.log" 2>&1; then
  build="OK"
else
  build="FAILED (tail of $RESULTS/gpu-check-build.log below)"
  status=1
fi
cp build/gpu-check/link-command.txt "$RESULTS/gpu-check-link-command.txt" 2>/dev/null
runtime="$("$PY" scripts/cxx_runtime_check.py python/qkv/_C*.so 2>&1)" || status=1
echo "build: $build, archs $GPU_ARCHS, $(elapsed)" >>"$SUMMARY"
[[ -n "$sm90_note" ]] && echo "$sm90_note" >>"$SUMMARY"
echo "runtime link: $runtime" >>"$SUMMARY"
if [[ "$build" != OK ]]; then
  tail -n 40 "$RESULTS/gpu-check-build.log" >>"$SUMMARY"
fi

# ---- 2. tests ---------------------------------------------------------------------------------
if [[ "$build" == OK && "${QKV_GPU_CHECK_BUILD_ONLY:-0}" != 1 ]]; then
  mapfile -t device_tests < <("${HELPER[@]}" device-tests)
  echo "gpu-check: tests/test_cuda.py, tests/test_errors_in_child.py, cuda runs of ${#device_tests[@]} core test files ($(elapsed))"
  # timeout signals the whole process group (pytest and its workers) if the tests hang
  # -v: a run cut short by the time limit still names, in the log, every test it finished
  PYTHONPATH="$ROOT/python" timeout "${QKV_GPU_CHECK_TEST_TIMEOUT:-600}" "${HELPER[@]}" run-tests \
    "$RESULTS/gpu-check-tests" -v -m "not cpu" tests/test_cuda.py tests/test_errors_in_child.py "${device_tests[@]}"
  tests_rc=$?
  if [[ -f "$RESULTS/gpu-check-tests.xml" ]]; then
    { echo -n "tests ($(elapsed)): "; "${HELPER[@]}" test-summary "$RESULTS/gpu-check-tests.xml"; } >>"$SUMMARY"
  else
    echo "tests: no report (pytest exit $tests_rc); see $RESULTS/gpu-check-tests.log" >>"$SUMMARY"
  fi
  [[ $tests_rc -eq 0 ]] || status=1

  # ---- 3. benchmark ---------------------------------------------------------------------------
  echo "gpu-check: python -m qkv.bench --device cuda --quick ($(elapsed))"
  if PYTHONPATH="$ROOT/python" timeout "${QKV_GPU_CHECK_BENCH_TIMEOUT:-600}" "$PY" -m qkv.bench --device cuda --quick --no-progress --out "$RESULTS" \
       >"$RESULTS/gpu-check-bench.log" 2>&1; then
    echo "benchmark: OK, $RESULTS/results.md ($(elapsed))" >>"$SUMMARY"
  else
    echo "benchmark: FAILED or reported errors (see $RESULTS/gpu-check-bench.log) ($(elapsed))" >>"$SUMMARY"
    status=1
  fi

  # ---- 4. Nsight Compute ----------------------------------------------------------------------
  if command -v ncu >/dev/null 2>&1 && [[ "${QKV_GPU_CHECK_NCU:-1}" != 0 ]]; then
    echo "gpu-check: ncu on each qkv kernel ($(elapsed))"
    metrics="$(ncu --query-metrics 2>/dev/null | "${HELPER[@]}" ncu-metrics)"
    if [[ -n "$metrics" ]] && PYTHONPATH="$ROOT/python" timeout 300 ncu --profile-from-start off --csv --page raw \
         --metrics "$metrics" "$PY" scripts/gpu_profile_kernels.py >"$RESULTS/gpu-check-ncu.csv" 2>"$RESULTS/gpu-check-ncu.err"; then
      { echo "Nsight Compute, B2 H16 L2048 D128 bf16 causal fwd+bwd (default path, then QKV_CUDA_KERNEL=generic):"
        "${HELPER[@]}" ncu-summary "$RESULTS/gpu-check-ncu.csv" "$metrics"; } >"$RESULTS/gpu-check-ncu.txt"
      cat "$RESULTS/gpu-check-ncu.txt" >>"$SUMMARY"
    else
      echo "ncu: failed (metrics '$metrics'; see $RESULTS/gpu-check-ncu.err)" >>"$SUMMARY"
    fi
  else
    echo "ncu: not run (not installed, or QKV_GPU_CHECK_NCU=0)" >>"$SUMMARY"
  fi
fi

echo "total: $(elapsed), $([[ $status -eq 0 ]] && echo PASSED || echo FAILED)" >>"$SUMMARY"

# ---- 5. hand the files back ---------------------------------------------------------------------
DEST="${QKV_GPU_CHECK_OUT:-${OUT:-}}"
if [[ -n "$DEST" ]]; then
  "${HELPER[@]}" collect "$DEST" "$SUMMARY" "$RESULTS/gpu-check-tests.log" "$RESULTS/gpu-check-tests.xml" \
    "$RESULTS/gpu-check-link-command.txt" "$RESULTS/results.md" "$RESULTS/results.json" "$RESULTS/gpu-check-ncu.csv" \
    "$RESULTS/gpu-check-bench.log" >/dev/null
fi
echo
cat "$SUMMARY"
exit $status
