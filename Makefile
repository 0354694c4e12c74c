# qkv: `make test` and `make bench` each set everything up from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# transformers for tests/test_transformers_integration.py and examples/transformers (pinned: the
# attention-function contract changes between releases; bump it on purpose, with those tests).
TRANSFORMERS_VERSION ?= 5.18.0
export MAX_JOBS ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

STAMP_DEPS := $(VENV)/.deps-installed
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') csrc/sources.txt setup.py

.PHONY: all venv build test test-python test-cpp bench bench-quick clean cuda-check gpu-check aarch64-cross-compiler cutlass-wheel

all: build

$(STAMP_DEPS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch pinned: this machine stores the CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q setuptools wheel ninja numpy pytest hypothesis expecttest matplotlib tqdm scikit-learn
	touch $@

# transformers without its optional dependency tree (never torch: --no-deps), plus the small
# packages that importing its models and generate() need. A stamp per pin: a new pin reinstalls.
STAMP_TRANSFORMERS := $(VENV)/.transformers-$(TRANSFORMERS_VERSION)
$(STAMP_TRANSFORMERS): $(STAMP_DEPS)
	$(PY) -m pip install -q --no-deps "transformers==$(TRANSFORMERS_VERSION)" "huggingface-hub==1.33.0" \
	  "tokenizers==0.23.2" "safetensors==0.8.0" regex pyyaml httpx httpcore h11 anyio idna certifi
	touch $@

venv: $(STAMP_DEPS) $(STAMP_TRANSFORMERS)

# In-place build of qkv._C; --no-build-isolation semantics: uses the venv's torch.
python/qkv/.built: $(STAMP_DEPS) $(EXT_SOURCES)
	cd $(CURDIR) && $(PY) setup.py -q build_ext --inplace
	touch $@

build: python/qkv/.built

test: test-python test-cpp

# tests/test_aarch64_build.py cross-compiles the CPU extension for aarch64 (the portable path,
# issue 16) with Debian's g++-aarch64-linux-gnu: a 56 MB download (212 MB installed), ~20 s to
# install, then 15 compiles at -O3 (2 min 15 s of CPU time on the 2-core Xeon: about 1.2 min at
# MAX_JOBS=2). Installed here when missing, and required (the test fails, never skips, without
# it); AARCH64_CHECK=0 leaves it out (the test then skips, saying why).
AARCH64_CHECK ?= 1
AARCH64_CXX := aarch64-linux-gnu-g++
aarch64-cross-compiler:
ifeq ($(AARCH64_CHECK),1)
	@command -v $(AARCH64_CXX) >/dev/null || { echo "Installing the aarch64 cross compiler (g++-aarch64-linux-gnu)"; \
	  (apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu) >/dev/null || \
	  { echo "could not install g++-aarch64-linux-gnu; install it, or run with AARCH64_CHECK=0"; exit 1; }; }
endif

test-python: build $(STAMP_TRANSFORMERS) aarch64-cross-compiler cutlass-wheel
	PYTHONPATH=$(CURDIR)/python QKV_REQUIRE_TRANSFORMERS=1 QKV_TRANSFORMERS_VERSION=$(TRANSFORMERS_VERSION) \
	  QKV_REQUIRE_AARCH64_CHECK=$(AARCH64_CHECK) $(PY) -m pytest -q tests

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

# The pinned CUTLASS header wheel (scripts/build_config.py: CUTLASS_REQUIREMENT; 6.4 MB) in .deps/
# (git-ignored): the CUDA check installs it from there, and a GPU session carries the folder to the
# GPU machine, which has no network (scripts/gpu_check.sh installs it there). See docs/cuda.md.
CUTLASS_REQUIREMENT = $(shell $(PYTHON) scripts/build_config.py cutlass-requirement)
cutlass-wheel:
	@ls .deps/nvidia_cutlass-$(subst nvidia-cutlass==,,$(CUTLASS_REQUIREMENT))-*.whl >/dev/null 2>&1 || \
	  $(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: -d .deps "$(CUTLASS_REQUIREMENT)"

# Compiles and links the CUDA extension against a CUDA build of torch (in .venv-cuda) and imports it,
# then checks the tensor-core kernels' machine code (scripts/cuda_sass_check.py); needs nvcc, no
# GPU. See scripts/cuda_build_check.sh and docs/cuda.md.
cuda-check: cutlass-wheel
	scripts/cuda_build_check.sh
	$${QKV_CUDA_VENV:-.venv-cuda}/bin/python scripts/cuda_sass_check.py $${QKV_CUDA_BUILD:-build/cuda-check}/lib/qkv

# On a machine with a GPU (no network needed, no venv: $(PYTHON)'s own torch): build for that GPU,
# run the CUDA tests (a crash fails one test), the GPU benchmark and Nsight Compute; results in
# benchmarks/results/<machine>/. See scripts/gpu_check.sh and docs/cuda.md.
gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh

clean:
	rm -rf build python/qkv/_C*.so python/qkv/.built tests/cpp/build
