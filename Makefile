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

# The test suite, then the documentation site, which executes every tutorial notebook once (`docs`).
# Two pytest-xdist workers (CI has 2 cores), one test file per worker so module fixtures load once;
# each worker computes with one torch thread (tests/conftest.py).
test: setup
	$(PY) -m pytest -n 2 --dist loadfile tests --ignore=tests/test_docs_site.py
	.venv/bin/lint-imports --no-cache
	$(MAKE) docs

# The site in site/, warnings as errors. mkdocs-jupyter runs each tutorial top to bottom in a fresh
# kernel while it builds (a cell that raises fails the build, as `pytest --nbmake tutorials` would)
# and renders it with its outputs; then tests/test_docs_site.py opens every tutorial page in headless
# Chromium and checks that it shows its figures.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet
	DIFFUSION_LENS_SITE=site $(PY) -m pytest tests/test_docs_site.py

# Notebooks are committed without outputs; CI executes them in the site build (`make docs`, which
# `make test` calls). This executes them in place instead, to browse them locally in Jupyter (strip
# the outputs again before committing: `make notebooks-clean`).
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
	$(PY) bench/abliterate.py
	$(PY) bench/scaling.py
