# usage-dashboard: developer entry points. `make help` lists them.
#
#   make demo              migrate, seed the demo data once, serve http://127.0.0.1:8000
#   make test              fast suite on SQLite (no browser, no external services)
#   make test-pg           the same suite on PostgreSQL ($(PG_URL))
#   make test-browser      Playwright tests in Debian's chromium
#   make lint / make fmt   ruff
#
# Knobs: PYTHON=/path/to/python3.12+  PYTEST_ARGS=...  MARKERS=...  PG_URL=...
#        RESEED=1 (demo: seed_demo --reset)  SEED_ARGS=...  ADDR=127.0.0.1:8000

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.ONESHELL:
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Tests: pytest arguments, and the marker expression for `make test` / `make test-pg`.
PYTEST_ARGS ?=
MARKERS ?= not browser and not services
PG_URL ?= postgres://postgres@127.0.0.1:5432/usage_test

# Demo server.
ADDR ?= 127.0.0.1:8000
RESEED ?=
SEED_ARGS ?=

.PHONY: help venv demo test test-pg test-services test-browser lint fmt bench

# Benchmark (bench/): events to load and days they span; BENCH_DATABASE_URL, BENCH_* knobs.
N ?= 10000000
DAYS ?= 90

help:
	@echo "Targets:"
	echo "  make venv          create .venv with Python 3.12+ and install the project (+dev)"
	echo "  make demo          migrate, seed demo data (once; RESEED=1 to start over), run $(ADDR)"
	echo "  make test          pytest -m \"$(MARKERS)\" on SQLite"
	echo "  make test-pg       the same on PostgreSQL (PG_URL=$(PG_URL))"
	echo "  make test-services pytest -m services (real Redis + Celery worker, on PostgreSQL)"
	echo "  make test-browser  pytest -m browser (Playwright + Debian chromium)"
	echo "  make lint          ruff check + ruff format --check"
	echo "  make bench         load N=$(N) events over DAYS=$(DAYS) days into PostgreSQL, measure, report"
	echo "  make fmt           ruff check --fix + ruff format"

venv: $(STAMP)

# Reinstall only when pyproject.toml changed (or the venv is missing / too old).
$(STAMP): pyproject.toml
	@found=""
	tried=""
	# try CMD...: accept the interpreter if it runs and is >= 3.12; remember what was seen.
	try() {
	  local v
	  v=$$("$$@" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) || return 1
	  tried="$${tried:+$$tried, }$$* = $$v"
	  "$$@" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || return 1
	  found=$$("$$@" -c 'import sys; print(sys.executable)')
	}
	if [ -x "$(PY)" ] && "$(PY)" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
	  echo "Using the existing $(VENV) ($$("$(PY)" --version))."
	else
	  if [ -e "$(VENV)" ]; then echo "$(VENV) is broken or older than Python 3.12: recreating it."; rm -rf "$(VENV)"; fi
	  pyenv_bin=$$(command -v pyenv || true)
	  if [ -z "$$pyenv_bin" ] && [ -x "$${PYENV_ROOT:-$$HOME/.pyenv}/bin/pyenv" ]; then pyenv_bin="$${PYENV_ROOT:-$$HOME/.pyenv}/bin/pyenv"; fi
	  { [ -n "$(PYTHON)" ] && try $(PYTHON); } \
	  || try python3.13 || try python3.12 || try python3 \
	  || { [ -n "$$pyenv_bin" ] && try env PYENV_VERSION=3.13.0 "$$pyenv_bin" exec python3; } \
	  || { [ -n "$$pyenv_bin" ] && try env PYENV_VERSION=3.12.1 "$$pyenv_bin" exec python3; } \
	  || for p in "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do [ -x "$$p" ] && try "$$p" && break; done \
	  || true
	  if [ -z "$$found" ]; then
	    echo "error: usage-dashboard needs Python 3.12 or newer." >&2
	    echo "       found: $${tried:-no python at all}" >&2
	    echo "       Install Python 3.12+ or point PYTHON at one: make demo PYTHON=/path/to/python3.13" >&2
	    exit 1
	  fi
	  echo "Creating $(VENV) with $$found ($$("$$found" --version))."
	  "$$found" -m venv "$(VENV)"
	fi
	echo "Installing the project and its dev dependencies into $(VENV) ..."
	"$(PY)" -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch "$(STAMP)"

demo: venv
	@"$(PY)" manage.py migrate --no-input
	if [ -n "$(RESEED)" ] && [ "$(RESEED)" != 0 ]; then
	  echo "Reseeding the demo data (seed_demo --reset $(SEED_ARGS)) ..."
	  "$(PY)" manage.py seed_demo --reset $(SEED_ARGS)
	elif "$(PY)" manage.py shell --no-imports -v 0 -c "import sys; from accounts.models import Organization; sys.exit(0 if Organization.objects.filter(slug='acme').exists() else 1)"; then
	  echo "Demo data already present (organization 'acme'); make demo RESEED=1 starts over."
	else
	  echo "Seeding the demo data (seed_demo $(SEED_ARGS)) ..."
	  "$(PY)" manage.py seed_demo $(SEED_ARGS)
	fi
	printf '\n  Demo logins at http://%s/  (password: demo)\n' "$(ADDR)"
	printf '    %-24s %s\n' \
	  admin@demo.test        "platform admin (also /admin/)" \
	  orgadmin@demo.test     "organization admin" \
	  lead@demo.test         "team lead" \
	  projectadmin@demo.test "project admin" \
	  member@demo.test       "member"
	echo
	exec "$(PY)" manage.py runserver "$(ADDR)"

test: venv
	@if [ -n "$${DATABASE_URL:-}" ]; then echo "pytest on PostgreSQL: $$DATABASE_URL"; else echo "pytest on SQLite"; fi
	"$(VENV)/bin/pytest" -m "$(MARKERS)" $(PYTEST_ARGS)

test-pg: venv
	@echo "pytest on PostgreSQL: $(PG_URL) (pytest-django uses the test_ database beside it)"
	DATABASE_URL="$(PG_URL)" "$(VENV)/bin/pytest" -m "$(MARKERS)" $(PYTEST_ARGS)

# Tests against the real Redis and a real Celery worker (PostgreSQL shares the data).
test-services: venv
	@echo "pytest -m services on PostgreSQL ($(PG_URL)) with Redis at 127.0.0.1:6379"
	DATABASE_URL="$(PG_URL)" "$(VENV)/bin/pytest" -m services $(PYTEST_ARGS)

# Browser tests read CHROMIUM (default: Debian's chromium on PATH). Exit code 5
# ("no tests collected") counts as success here: the browser suite may be empty.
test-browser: venv
	@export CHROMIUM="$${CHROMIUM:-$$(command -v chromium || true)}"
	if [ -z "$$CHROMIUM" ]; then
	  echo "error: no chromium found; install Debian's chromium (apt-get install chromium) or set CHROMIUM=/path" >&2
	  exit 1
	fi
	echo "pytest -m browser with CHROMIUM=$$CHROMIUM"
	rc=0
	"$(VENV)/bin/pytest" -m browser $(PYTEST_ARGS) || rc=$$?
	if [ "$$rc" -eq 5 ]; then echo "No browser tests collected (pytest exit 5): OK."; rc=0; fi
	exit "$$rc"

# Recreates the bench database (default usage_bench), loads N events through the bulk path,
# measures dashboard, events log, APIs, HTTP ingestion and CSV export, and writes
# bench-reports/bench-<N>-<time>.md and .json. Fails only on errors, never on times.
bench: venv
	@"$(PY)" -m bench --events "$(N)" --days "$(DAYS)"

lint: venv
	@rc=0
	"$(VENV)/bin/ruff" check . || rc=1
	"$(VENV)/bin/ruff" format --check . || rc=1
	exit "$$rc"

fmt: venv
	@rc=0
	"$(VENV)/bin/ruff" check --fix . || rc=$$?
	"$(VENV)/bin/ruff" format .
	exit "$$rc"
