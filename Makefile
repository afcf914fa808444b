# One virtual environment at .venv/; torch is pinned so that this machine takes its local CPU wheel.
PY      := .venv/bin/python
TORCH   ?= torch==2.13.0

.PHONY: setup demo test bench docs notebooks notebooks-clean
setup: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) -m diffusion_lens demo

# The test suite and every tutorial notebook (nbmake runs each one top to bottom in a fresh kernel:
# a cell that raises fails CI), then the documentation site with warnings as errors.
test: setup
	$(PY) -m pytest --nbmake tests tutorials
	.venv/bin/lint-imports --no-cache
	$(MAKE) docs

docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# Notebooks are committed without outputs; this executes them in place for browsing (strip the
# outputs again before committing: `make notebooks-clean`).
notebooks: setup
	$(PY) -m pytest --nbmake --overwrite tutorials

notebooks-clean: setup
	$(PY) scripts/strip_notebooks.py tutorials/*.ipynb

bench: setup
	$(PY) bench/forward.py
	$(PY) bench/load_memory.py
	$(PY) bench/generate.py
	$(PY) bench/forward_families.py
	$(PY) bench/steering.py
	$(PY) bench/fast_dllm.py
	$(PY) bench/steering_cache.py --threads 1
	$(PY) bench/diffusion_gemma.py
