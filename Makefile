# The README's commands. Each does its own set-up the first time: a virtual environment in .venv with
# torch==2.13.0 installed first (an unpinned torch pulls a multi-GB CUDA build), then this project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := out/demo

.PHONY: setup demo test lint test-slow gpu-check capi cpp-example bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/bigcode-deploy export $(DEMO_DIR) --force
	$(BIN)/bigcode-deploy optimize $(DEMO_DIR) $(DEMO_DIR)-ort --target ort --last-token-logits --force
	$(BIN)/bigcode-deploy verify $(DEMO_DIR)-ort
	$(BIN)/bigcode-deploy generate $(DEMO_DIR)-ort --prompt 'def fibonacci(n):' --max-new-tokens 64 --repetition-penalty 1.3

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -s

capi: $(STAMP)
	$(BIN)/python -m bigcode_deploy.runtime.capi_build build/capi

cpp-example: capi
	cmake -S examples/cpp -B build/example -DCMAKE_BUILD_TYPE=Release
	cmake --build build/example
	@echo "run: build/example/bigcode_generate BUNDLE --prompt 'def fibonacci(n):'"

bench: $(STAMP)
	$(BIN)/python benchmarks/compare.py

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) out build
