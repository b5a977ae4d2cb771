# Every target sets itself up: a fresh machine needs only Python >= 3.11 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test check lint typecheck docs pytest bench soak clean redis-server

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

## make demo: the sawtooth and the fix, side by side under a real uvicorn server.
demo: $(VENV)/.installed-demo
	$(PY) examples/demo/run.py

## make test: lint, types, docs build and the whole test suite.
test: lint typecheck docs pytest

## make check: the fast loop while developing: lint, types, and the tests not marked slow.
check: lint typecheck redis-server
	$(PY) -m pytest -m "not slow" -q

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy --strict src

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --quiet --site-dir site

pytest: $(STAMP) redis-server
	$(PY) -m pytest

## redis-server: the Redis tier's tests and benchmark start their own servers from the
## Debian package redis-server (valkey-server works too); installed here when missing and
## apt-get can (as root). Otherwise those tests skip, naming the package.
redis-server:
	@command -v redis-server >/dev/null || command -v valkey-server >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing the Debian package redis-server for the Redis tier's tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends redis-server >/dev/null; \
	else \
		echo "redis-server not found and apt-get not usable here: the Redis tier's tests" \
			"will skip. Install the package redis-server (or valkey-server)."; \
	fi

## make bench: every benchmark, one after the other, then one table of the DESIGN.md targets.
bench: $(STAMP) redis-server
	$(PY) benchmarks/report.py

soak: $(STAMP)
	$(PY) benchmarks/soak.py

clean:
	rm -rf $(VENV) build dist site .pytest_cache .mypy_cache .ruff_cache .hypothesis
