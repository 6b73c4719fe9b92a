# Quick start: `make demo` (set up + run the default evaluation), `make test` (set up with the test tools + the suite).
PY := .venv/bin/python

.PHONY: setup setup-dev demo test lint
setup:
	@bash scripts/setup.sh main

setup-dev:
	@bash scripts/setup.sh dev

demo: setup
	$(PY) run_eval.py

test: setup-dev
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 -q tests

lint: setup-dev
	$(PY) -m ruff check .
