# Every target sets itself up: a fresh machine needs only Python >= 3.11 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: demo test check lint typecheck docs pytest other-pythons core-tests system-deps redis-server bench soak clean

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

## make test: lint, types, docs build and the whole test suite; then the core's tests again
## under the other CPythons found here.
test: lint typecheck docs pytest other-pythons

## make check: the fast loop while developing: lint, types, and the tests not marked slow,
## in four pytest-xdist workers (most of a test's time is a server starting or a wait), and the
## model-based check (tests/test_model.py) searching 150 examples instead of 500. Bytecode is
## written even where PYTHONDONTWRITEBYTECODE is set: pytest then keeps each test module's
## rewritten asserts in __pycache__, and four workers collect in 2 s, not 7.
check: lint typecheck redis-server
	env -u PYTHONDONTWRITEBYTECODE PERREQUEST_MODEL_EXAMPLES=150 \
		$(PY) -m pytest -m "not slow" -q -n 4 --dist worksteal

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks docs/snippets
	$(PY) -m ruff format --check src tests examples benchmarks docs/snippets

typecheck: $(STAMP)
	$(PY) -m mypy --strict src

# --strict without --quiet: with --quiet, mkdocs drops the warnings that strict mode counts.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

## Three pytest-xdist workers on two cores (most of a test's time is a server starting or a
## wait: two workers kept 1.2 cores busy), stealing work so that no worker idles at the end
## behind the callgrind smoke tests: the whole suite in about 6.5 minutes, not 9.
pytest: $(STAMP) system-deps
	$(PY) -m pytest -n 3 --dist worksteal

# The core's tests (single-flight, scopes, the store, the collector hook, batching) under
# CPython 3.12 and 3.13 when this machine has them (on the path, or under pyenv), each in a
# venv of its own: frames, recursion limits and the collector differ from 3.11's, and two
# bugs of single-flight showed only there. The whole suite: see CONTRIBUTING.md.
CORE_TESTS := tests/test_memo.py tests/test_memo_async.py tests/test_memo_threads.py \
	tests/test_flight_edges.py tests/test_regressions.py tests/test_scope.py tests/test_store.py \
	tests/test_gc_guard.py tests/test_batch.py tests/test_batch_edges.py tests/test_shared.py \
	tests/test_guards_active.py tests/test_guards_batch_store.py tests/test_guards_checks.py \
	tests/test_guards_entries.py tests/test_guards_flight.py tests/test_guards_store.py \
	tests/test_guards_shared.py tests/test_guards_shared_errors.py tests/test_guards_batch.py \
	tests/test_guards_batch_tick.py tests/test_guards_cleanup_signals.py \
	tests/test_guards_shared_signals.py tests/test_review_findings.py tests/test_review2_findings.py \
	tests/test_review3_findings.py
OTHER_PYTHONS ?= $(shell for v in 3.12 3.13; do \
	p=$$(command -v python$$v 2>/dev/null); \
	if [ -n "$$p" ] && "$$p" -c '' 2>/dev/null; then echo "$$p"; \
	else ls -d $$HOME/.pyenv/versions/$$v.*/bin/python$$v 2>/dev/null | tail -n 1; fi; done)

other-pythons:
	@[ -n "$(strip $(OTHER_PYTHONS))" ] || echo "No CPython 3.12 or 3.13 here: the core's tests ran on $$($(PY) -V) only."
	@for py in $(OTHER_PYTHONS); do \
		v=$$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
		echo "== the core's tests under $$("$$py" -V)"; \
		$(MAKE) --no-print-directory VENV=.venv-$$v PYTHON="$$py" core-tests || exit 1; \
	done

core-tests: $(STAMP) redis-server
	$(PY) -m pytest -n 2 -q $(CORE_TESTS)

# What the tests need from Debian: chromium (the toolbar panel's browser test) and
# redis-server (below), installed where apt-get can be run (root, as on CI); else
# say what is missing.
system-deps: redis-server
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "chromium is missing: install Debian's chromium package for the browser test"; \
	fi

# redis-server: the Redis tier's tests and benchmark start their own servers from
# Debian's redis-server (valkey-server works too); without one those tests skip,
# naming the package.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends redis-server >/dev/null; \
	else \
		echo "redis-server is missing: install Debian's redis-server package (or" \
			"valkey-server) for the Redis tier's tests"; \
	fi

## make bench: every benchmark, one after the other, then one table of the DESIGN.md targets.
bench: $(STAMP) redis-server
	$(PY) benchmarks/report.py

soak: $(STAMP)
	$(PY) benchmarks/soak.py

clean:
	rm -rf $(VENV) .venv-3.* build dist site .pytest_cache .mypy_cache .ruff_cache .hypothesis
