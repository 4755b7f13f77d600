# The commands of the README: `make demo`, `make test` and `make lab` (and `make site`). All install into .venv first.
# `make test` also builds the wheel and runs it from its own venv, outside the checkout (.ci/wheel_check), and runs
# the notebooks two at a time (each kernel on one thread), one notebook per worker.
# `make assets RAY=1` trains the library's adapters as Ray tasks on a local cluster (RAY_ADDRESS: a running one).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export SEMLA_THREADS ?= 1
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache
export MPLBACKEND ?= Agg

.PHONY: install demo test wheel-check assets bench lab site clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,docs]"
	$(PY) -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/semla-lab evaluate --out runs/demo

test: $(STAMP) wheel-check
	$(PY) -m ruff check semla_lab tests benchmarks
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg --nbval-current-env -p no:cacheprovider \
		-n 2 --dist loadfile notebooks

wheel-check: $(STAMP)
	PYTHON=$(PY) .ci/wheel_check

assets: $(STAMP)
	$(VENV)/bin/semla-lab build all $(if $(RAY),--ray)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# JupyterLab from the project's venv on notebooks/ (tools/lab.sh: no browser; --allow-root only as root).
lab: $(STAMP)
	VENV=$(VENV) tools/lab.sh

# The documentation site into site/: docs/, the notebooks from their stored outputs, the API reference. Strict: a
# broken internal link or a missing page fails the build (tests/test_site.py builds it too, then opens it in Chromium).
site: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .numba_cache .pytest_cache .wheel_check site .cache
