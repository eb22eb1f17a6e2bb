# Two entry points that work on a fresh machine: `make demo` (the app) and `make test`.
# Both create .venv and install requirements.txt on first use (CPU-only torch; about 2 minutes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False MPLBACKEND=Agg

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

.PHONY: install demo ask test test-slow bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(OFFLINE) $(PY) app.py

ask: $(VENV)/.installed
	$(OFFLINE) $(PY) -m vidlmm ask --video assets/examples/moving_shapes.mp4 \
		--question "What happens in the video?" --max-new-tokens 32 --json

test: $(VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(OFFLINE) $(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(OFFLINE) $(PY) benchmarks/bench_decode.py
	$(OFFLINE) $(PY) benchmarks/bench_connectors.py
	$(OFFLINE) $(PY) benchmarks/bench_pipeline.py
	$(OFFLINE) $(PY) benchmarks/bench_zeroing.py
	$(OFFLINE) $(PY) benchmarks/bench_fullsize.py
	$(OFFLINE) $(PY) benchmarks/bench_startup.py
