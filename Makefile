# Two entry points for a fresh clone (see README): `make demo` and `make test`; `make bench` too.
# Both create .venv, install torch and the build tools, and build fastlstm in place.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench cuda-emu torch-2.11-headers

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What the build reads: `make install` reinstalls only when one of them is newer than the last
# install, and setup.py keeps ninja's build directory (build/), so only the changed files recompile.
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f)
INSTALLED := $(VENV)/.fastlstm-installed

install: $(INSTALLED)

$(INSTALLED): $(BIN)/python $(BUILD_INPUTS)
	$(BIN)/pip install -q "torch>=2.11" numpy pybind11 ninja pytest tqdm matplotlib "setuptools>=64" wheel
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(BIN)/python -m pytest -q tests
	$(BIN)/python tests/cuda_emu/run.py --ci
	$(BIN)/python tests/torch_headers_check.py --version 2.11.0

# The CUDA kernels executed on the CPU (tests/cuda_emu): needs torch in the venv, not the extension.
cuda-emu: $(BIN)/python
	$(BIN)/pip install -q "torch>=2.11" numpy
	$(BIN)/python tests/cuda_emu/run.py

demo: install
	$(BIN)/python benchmarks/demo_long_signal.py --quick

bench: install
	$(BIN)/python benchmarks/bench.py --quick

# csrc/cuda/cublas_gemm.cpp compiled (-fsyntax-only) against torch 2.11.0's headers, the GPU
# machine's torch (the include tree is downloaded once into ~/.cache/fastlstm).
torch-2.11-headers: install
	$(BIN)/python tests/torch_headers_check.py --version 2.11.0
