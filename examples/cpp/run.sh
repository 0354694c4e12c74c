#!/usr/bin/env bash
# Builds and installs qkv with CMake, builds this example against the installed package
# (find_package(qkv)), and runs it. Arguments go to the program: a number of training steps
# or --smoke.
#
#   examples/cpp/run.sh            # 1500 steps
#   examples/cpp/run.sh --smoke    # 120 steps, seconds
#   PYTHON=/path/to/python examples/cpp/run.sh 100
#
# Build dirs (under BUILD_DIR, default <repo>/build): cmake/ (qkv; the same dir `make test-cpp`
# uses, so an existing build is reused), install/ (the installed package), example-cpp/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
build="${BUILD_DIR:-$repo/build}"
jobs="${MAX_JOBS:-2}"
torch_prefix="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"

echo "== qkv: configure, build, install into $build/install"
cmake -S "$repo" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" >/dev/null
cmake --build "$build/cmake" -j "$jobs"
cmake --install "$build/cmake" --prefix "$build/install" >/dev/null

echo "== example: configure and build against the installed qkv"
cmake -S "$here" -B "$build/example-cpp" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$build/install;$torch_prefix" >/dev/null
cmake --build "$build/example-cpp" -j "$jobs"

echo "== run"
"$build/example-cpp/qkv_seq2seq" "$@"
