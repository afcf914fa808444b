# One virtual environment at .venv/; torch is pinned so that this machine takes its local CPU wheel.
PY      := .venv/bin/python
TORCH   ?= torch==2.13.0

.PHONY: setup demo test bench
setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m diffusion_lens demo

test: setup
	$(PY) -m pytest tests

bench: setup
	$(PY) bench/forward.py
	$(PY) bench/load_memory.py
