# Two entry points, each doing all of its own set-up from a fresh clone:
#   make demo   install, then run the gateway in front of a real Triton (CPU)
#   make test   install (Debian packages and the virtualenv), lint, then the whole suite
#   make bench  install wrk and nginx, then the quick benchmark (bench/README.md)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
APT_PACKAGES := redis-server prometheus curl openssl

.PHONY: demo test bench install install-test system-packages lint

demo: install
	$(BIN)/aigw demo

test: system-packages install-test lint
	$(BIN)/pytest

bench: install
	$(MAKE) system-packages APT_PACKAGES="wrk nginx-light"
	$(BIN)/python bench/run.py --quick

lint:
	$(BIN)/ruff check gateway tests
	$(BIN)/ruff format --check gateway tests

install: $(VENV)/.installed-demo
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-demo

# Debian packages the suite needs; installed only when missing (needs root or sudo).
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  sudo_cmd=""; [ "$$(id -u)" = 0 ] || sudo_cmd=sudo; \
	  $$sudo_cmd apt-get update -qq && $$sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
