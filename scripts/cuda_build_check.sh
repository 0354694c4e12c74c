#!/usr/bin/env bash
# Proves the CUDA extension compiles and links on a machine without a GPU:
#  1. creates .venv-cuda (if missing) with a CUDA build of torch (scripts/cuda-venv-requirements.txt),
#     and installs the pinned CUTLASS header wheel into it (scripts/build_config.py's
#     CUTLASS_REQUIREMENT, from .deps/: `make cutlass-wheel`) for the sm_90a kernels,
#  2. builds qkv._C with QKV_CUDA=1 for the archs in QKV_CUDA_ARCHS (default "8.0;9.0") into
#     build/cuda-check (incremental: ninja reuses objects whose sources did not change),
#  3. imports qkv from that build (no CUDA call happens at import) and checks that the core ops
#     have CUDA kernels and that the CPU kernels of this build still run; checks that qkv._C uses
#     the shared C++ runtime (scripts/cxx_runtime_check.py),
#  4. configures and builds the CMake library (libqkv, what LibTorch users link) with QKV_CUDA=ON
#     for QKV_CMAKE_CUDA_ARCHS (default "9.0": step 2 already covers every arch) into
#     build/cuda-check/cmake (incremental), checks its C++ runtime, loads it into torch and checks
#     that it registers the CUDA kernels.
#
# Environment:
#   QKV_CUDA_VENV     venv path (default .venv-cuda)
#   QKV_CUDA_BUILD    build dir (default build/cuda-check)
#   QKV_CUDA_ARCHS    CUDA archs (default "8.0;9.0")
#   QKV_CMAKE_CUDA_ARCHS  CUDA archs of the CMake build (default "9.0")
#   QKV_WHEEL_DIRS    colon-separated local wheel folders to install from with --no-index;
#                     default: those of /opt/pypi-more/files, /opt/pypi/files, /opt/wheels that exist.
#                     Set it to "" to install through pip's configured indexes (several GB download).
#   CUDA_HOME         CUDA toolkit (default: the folder above `which nvcc`, else /usr/local/cuda)
#   MAX_JOBS          parallel compile jobs (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${QKV_CUDA_VENV:-.venv-cuda}"
BUILD="${QKV_CUDA_BUILD:-build/cuda-check}"
export QKV_CUDA=1
export QKV_CUDA_ARCHS="${QKV_CUDA_ARCHS:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
PY="$VENV/bin/python"

if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    # nvcc on the PATH may be a wrapper script: ask nvcc where its toolkit is.
    CUDA_HOME="$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)"
    CUDA_HOME="$(cd "$CUDA_HOME" && pwd)"
  fi
fi
export CUDA_HOME
if [[ ! -x "${CUDA_HOME:-}/bin/nvcc" || ! -f "$CUDA_HOME/include/cuda_runtime_api.h" ]]; then
  echo "cuda-check: no CUDA toolkit (bin/nvcc and include/cuda_runtime_api.h) under CUDA_HOME='${CUDA_HOME:-}'" >&2
  exit 1
fi
export PATH="$CUDA_HOME/bin:$PATH"

stamp() { date +%s; }
t0=$(stamp)

# ---- 1. the venv ---------------------------------------------------------------------------
REQS="$ROOT/scripts/cuda-venv-requirements.txt"
VENV_STAMP="$VENV/.qkv-cuda-deps"
if [[ ! -f "$VENV_STAMP" ]] || ! cmp -s "$REQS" "$VENV_STAMP"; then
  echo "cuda-check: creating $VENV (torch CUDA build and its runtime libraries)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  pip_args=(-q --disable-pip-version-check --no-deps)
  if [[ -z "${QKV_WHEEL_DIRS+set}" ]]; then
    QKV_WHEEL_DIRS=""
    for d in /opt/pypi-more/files /opt/pypi/files /opt/wheels; do
      [[ -d "$d" ]] && QKV_WHEEL_DIRS="${QKV_WHEEL_DIRS:+$QKV_WHEEL_DIRS:}$d"
    done
  fi
  if [[ -n "$QKV_WHEEL_DIRS" ]]; then
    pip_args+=(--no-index)
    IFS=: read -r -a dirs <<<"$QKV_WHEEL_DIRS"
    for d in "${dirs[@]}"; do pip_args+=(--find-links "$d"); done
  fi
  "$PY" -m pip install "${pip_args[@]}" -r "$REQS"
  cp "$REQS" "$VENV_STAMP"
fi
# The pinned CUTLASS headers (the sm_90a kernels): their own step and stamp, so a new pin installs
# one 6 MB wheel (--no-deps, from .deps/) instead of recreating the venv.
CUTLASS_REQ="$(python3 scripts/build_config.py cutlass-requirement)"
CUTLASS_STAMP="$VENV/.qkv-cutlass"
if [[ "$(cat "$CUTLASS_STAMP" 2>/dev/null)" != "$CUTLASS_REQ" ]]; then
  echo "cuda-check: installing $CUTLASS_REQ into $VENV (from .deps/)"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-index --find-links "$ROOT/.deps" "$CUTLASS_REQ"
  echo "$CUTLASS_REQ" >"$CUTLASS_STAMP"
fi
t1=$(stamp)
"$PY" -c "import torch; assert torch.version.cuda, 'torch in $VENV is not a CUDA build'; print('cuda-check: torch', torch.__version__, 'CUDA', torch.version.cuda)"

# ---- 2. the build --------------------------------------------------------------------------
echo "cuda-check: building qkv._C with CUDA for archs $QKV_CUDA_ARCHS into $BUILD (MAX_JOBS=$MAX_JOBS)"
mkdir -p "$BUILD"
"$PY" setup.py -q build_py --build-lib "$BUILD/lib" \
  build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/temp"
t2=$(stamp)

# ---- 3. import and registration checks -----------------------------------------------------
LIB="$(cd "$BUILD/lib" && pwd)"
(cd "$BUILD" && PYTHONPATH="$LIB" "$ROOT/$PY" - <<'EOF'
import os, sys
import torch
import qkv

lib = os.environ["PYTHONPATH"]
assert qkv._C.__file__.startswith(lib), f"imported {qkv._C.__file__}, not the build in {lib}"
for op in ("attention", "attention_backward", "attention_weights"):
    for key in ("CUDA", "CPU", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qkv::{op}", key), f"qkv::{op} has no {key} kernel"
# The CPU kernels of the CUDA build still run (no GPU is needed for this).
q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
out, lse = torch.ops.qkv.attention(q, q, q)
ref = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, -1) @ q
assert torch.allclose(out, ref), "CPU kernel of the CUDA build disagrees with the reference"
print(f"cuda-check: OK: {qkv._C.__file__} has CUDA kernels for attention, attention_backward, "
      f"attention_weights; GPU present: {torch.cuda.is_available()}")
EOF
)
"$PY" scripts/cxx_runtime_check.py "$LIB"/qkv/_C*.so
t3=$(stamp)

# ---- 4. the CMake library with CUDA ----------------------------------------------------------
CMAKE_BUILD="$BUILD/cmake"
CMAKE_ARCHS="${QKV_CMAKE_CUDA_ARCHS:-9.0}"
cmake_args=(-DQKV_CUDA=ON -DQKV_CUDA_ARCHS="$CMAKE_ARCHS" -DCMAKE_BUILD_TYPE=Release
            -DPython3_EXECUTABLE="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
            -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc"
            -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')")
# torch's CMake config links NVRTC; a toolkit assembled from pip wheels may have it only in the venv.
if ! ls "$CUDA_HOME"/lib64/libnvrtc.so* >/dev/null 2>&1; then
  nvrtc="$(find "$VENV" -name 'libnvrtc.so*' -not -name '*builtins*' -not -name '*.alt.*' | head -n 1)"
  [[ -n "$nvrtc" ]] && cmake_args+=(-DCUDA_nvrtc_LIBRARY="$(cd "$(dirname "$nvrtc")" && pwd)/$(basename "$nvrtc")")
fi
echo "cuda-check: building the CMake library with CUDA for archs $CMAKE_ARCHS into $CMAKE_BUILD"
cmake -S . -B "$CMAKE_BUILD" "${cmake_args[@]}" >"$BUILD/cmake-configure.log" 2>&1 ||
  { cat "$BUILD/cmake-configure.log"; exit 1; }
grep -q "qkv: CUDA kernels ON" "$BUILD/cmake-configure.log"
cmake --build "$CMAKE_BUILD" --target qkv -j "$MAX_JOBS"
LIBQKV="$(cd "$CMAKE_BUILD" && pwd)/libqkv.so"
"$PY" scripts/cxx_runtime_check.py "$LIBQKV"
LIBQKV="$LIBQKV" "$PY" - <<'EOF'
import os
import torch
torch.ops.load_library(os.environ["LIBQKV"])
for op in ("attention", "attention_backward", "attention_weights"):
    for key in ("CUDA", "CPU", "Meta"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qkv::{op}", key), f"libqkv: qkv::{op} has no {key} kernel"
print("cuda-check: OK: libqkv.so (CMake) has CUDA kernels for attention, attention_backward, attention_weights")
EOF
t4=$(stamp)
echo "cuda-check: venv $((t1 - t0)) s, build $((t2 - t1)) s, import check $((t3 - t2)) s," \
     "CMake build and check $((t4 - t3)) s, total $((t4 - t0)) s"
