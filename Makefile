# qkv: `make test` and `make bench` each set everything up from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export MAX_JOBS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

STAMP_DEPS := $(VENV)/.deps-installed
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') csrc/sources.txt setup.py

.PHONY: all venv build test test-python test-cpp bench bench-quick clean cuda-check gpu-check

all: build

$(STAMP_DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned: this machine stores the CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q setuptools wheel ninja numpy pytest hypothesis expecttest matplotlib tqdm scikit-learn
	touch $@

venv: $(STAMP_DEPS)

# In-place build of qkv._C; --no-build-isolation semantics: uses the venv's torch.
python/qkv/.built: $(STAMP_DEPS) $(EXT_SOURCES)
	cd $(CURDIR) && $(PY) setup.py -q build_ext --inplace
	touch $@

build: python/qkv/.built

test: test-python test-cpp

test-python: build
	PYTHONPATH=$(CURDIR)/python $(PY) -m pytest -q tests

# LibTorch build through CMake (the path C++ users take) and the GoogleTest suite via ctest.
CMAKE_BUILD := build/cmake
test-cpp: $(STAMP_DEPS)
	@command -v cmake >/dev/null || { echo "cmake is required for the C++ tests"; exit 1; }
	@test -f /usr/include/gtest/gtest.h || { echo "Installing GoogleTest (libgtest-dev)"; \
	  (apt-get update -qq && apt-get install -y -qq libgtest-dev) >/dev/null || \
	  { echo "could not install libgtest-dev; install GoogleTest and rerun"; exit 1; }; }
	cmake -S . -B $(CMAKE_BUILD) -DQKV_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(CMAKE_BUILD) -j $(MAX_JOBS)
	cd $(CMAKE_BUILD) && ctest --output-on-failure

bench: build
	PYTHONPATH=$(CURDIR)/python $(PY) -m qkv.bench $(BENCH_ARGS)

bench-quick: build
	PYTHONPATH=$(CURDIR)/python $(PY) -m qkv.bench --quick $(BENCH_ARGS)

# Compiles and links the CUDA extension against a CUDA build of torch (in .venv-cuda) and imports it,
# then checks the tensor-core kernels' machine code (scripts/cuda_sass_check.py); needs nvcc, no
# GPU. See scripts/cuda_build_check.sh and docs/cuda.md.
cuda-check:
	scripts/cuda_build_check.sh
	$${QKV_CUDA_VENV:-.venv-cuda}/bin/python scripts/cuda_sass_check.py $${QKV_CUDA_BUILD:-build/cuda-check}/lib/qkv

# On a machine with a GPU (no network needed, no venv: $(PYTHON)'s own torch): build for that GPU,
# run the CUDA tests (a crash fails one test), the GPU benchmark and Nsight Compute; results in
# benchmarks/results/<machine>/. See scripts/gpu_check.sh and docs/cuda.md.
gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh

clean:
	rm -rf build python/qkv/_C*.so python/qkv/.built tests/cpp/build
