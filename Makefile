# Two commands do all the set-up (see README.md):
#   make serve   install everything into .venv and run `asrd serve` (embedded NATS + workers)
#   make test    install everything (Python packages, redis-server for tests) and run every check
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup serve test lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)
	@command -v redis-server >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 \
	  && command -v openssl >/dev/null 2>&1 || { \
	  echo "installing redis-server, systemd (systemd-analyze) and openssl from Debian for the tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server systemd openssl; }

serve: $(STAMP)
	$(VENV)/bin/asrd serve $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(PY) -m mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)
