# Quick start: `make demo` (tiny Qwen2.5-VL fine-tune on generated data) and `make test`.
# Both create .venv, install torch ($(TORCH_SPEC)) and the build tools, build mmfuse, then run.
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.mmfuse-deps
# Runtime deps + build tools + test deps. torch is pinned separately (TORCH_SPEC) so pip never
# swaps it for a multi-GB CUDA build; transformers is the test oracle only, never a runtime import.
# triton is a test dependency here: its interpreter runs the Triton kernels on CPU tensors
# (tests/ops); pinned to the version whose interpreter those tests were written against.
# av (PyAV, FFmpeg bundled) decodes video files; the tests encode and decode real MPEG-4 clips.
DEPS := numpy safetensors tokenizers pillow pyyaml tqdm av \
        "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja \
        pytest psutil matplotlib "transformers==5.24.0" "triton==3.9.0"

.PHONY: demo test build dev bench bench-quick clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(VPY) Makefile
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q $(DEPS) "$(TORCH_SPEC)"
	touch $@

# Build and install the package (C++ core + pybind11 module) into .venv; incremental via build/.
build: $(DEPS_STAMP)
	$(VPY) -m pip install -q --no-build-isolation --no-deps .

# In-place build for development: python/mmfuse/_C*.so next to the sources (use PYTHONPATH=python).
dev: $(DEPS_STAMP)
	$(VENV)/bin/cmake -S . -B build/dev -G Ninja -DMMFUSE_BUILD_PYTHON=ON -DCMAKE_BUILD_TYPE=Release \
	  -Dpybind11_DIR=$$($(VPY) -m pybind11 --cmakedir) -DPython_EXECUTABLE=$$(realpath $(VPY))
	$(VENV)/bin/cmake --build build/dev
	cp build/dev/_C*.so python/mmfuse/

demo: build
	$(VENV)/bin/mmfuse demo

test: build
	$(VPY) -m pytest -q tests

bench: build
	$(VPY) bench/run_all.py

# Smoke run of the benchmark harness on small shapes (about a minute); timings are not meaningful.
bench-quick: dev
	PYTHONPATH=python:. $(VPY) bench/run_all.py --quick

clean:
	rm -rf build dist python/mmfuse/_C*.so
