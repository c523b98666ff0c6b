# volagent developer entry points. Run as root on Debian/Ubuntu.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: help deps demo test unit lint fmt bench clean install

help:
	@echo "make demo   install what is needed, then run a whole node and a story through it (KEEP=1 leaves it up)"
	@echo "make test   install what is needed, then run the whole test suite (real components)"
	@echo "make lint   ruff and mypy --strict"
	@echo "make bench  the benchmarks, agent against raw in the same run (bench/results/latest.md)"
	@echo "make unit   only the unit tests (no root, no components)"
	@echo "make fmt    ruff format and autofix"
	@echo "make install  install the agent, its systemd unit and an example config (as root)"

deps:
	scripts/install-deps

demo: deps
	scripts/demo

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

unit: deps
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: deps
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: deps
	$(PY) -m bench

install:
	scripts/install

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
