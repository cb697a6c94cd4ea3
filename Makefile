# q2lab developer entry points.  `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the CPU build of torch; GPU machines (nvidia-smi present) keep pip's default build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
# The staged data sets (see ../shared/data/SOURCES.md); override with Q2LAB_DATA=/path.
export Q2LAB_DATA ?= $(abspath ../shared/data)
STUDY ?= examples/quickstart.yaml
OUT ?= runs/quickstart
PYTEST_ARGS ?=

.PHONY: install install-llamacpp demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,eval]"
	touch $@

install: $(VENV)/.installed

# Optional peer: llama.cpp through llama-cpp-python (builds from source, ~10-15 min on 2 cores), plus
# llama.cpp's own llama-quantize program compiled from the same version's source (~10 s:
# tests/oracles/llama_tools.py).  Tests that use them as oracles skip with a message when they are
# absent (and fail in CI).  The build is portable AVX2, not -march=native: on an AVX-512 machine
# (2026-12-04) the native build of 0.3.36 segfaults in llama_decode on Gemma-3-270M, the AVX2 one
# passes.  pip's own wheel cache keys a built wheel by its source only, not by CMAKE_ARGS, so it would
# hand back a wheel built with other flags: the wheel is built with --no-cache-dir into a folder keyed
# by version and flags, and installed from there.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMACPP_WHEELS ?= $(HOME)/.cache/q2lab/wheels/llama-cpp-python-$(LLAMACPP_VERSION)-$(shell echo "$(LLAMACPP_CMAKE_ARGS)" | sha256sum | cut -c1-12)
install-llamacpp: install
	if ! ls $(LLAMACPP_WHEELS)/*.whl >/dev/null 2>&1; then \
		rm -rf $(LLAMACPP_WHEELS).tmp && \
		CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(PIP) wheel -q --no-cache-dir --no-deps \
			-w $(LLAMACPP_WHEELS).tmp "llama-cpp-python==$(LLAMACPP_VERSION)" && \
		rm -rf $(LLAMACPP_WHEELS) && mv $(LLAMACPP_WHEELS).tmp $(LLAMACPP_WHEELS); \
	fi
	$(PIP) install -q --force-reinstall --no-deps $(LLAMACPP_WHEELS)/*.whl
	$(PIP) install -q -e ".[llamacpp]"
	$(PY) -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
	$(PY) -m tests.oracles.llama_tools

demo: install
	$(VENV)/bin/q2lab study $(STUDY) --out $(OUT)
	@echo "report: $(OUT)/report.md  (plots: $(OUT)/pareto.png, records: $(OUT)/results.jsonl)"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check q2lab tests benchmarks
	$(VENV)/bin/ruff format --check q2lab tests benchmarks

bench: install
	$(PY) benchmarks/gptq_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
